package objects

import (
	"bytes"
	"sync"
)

// DecodeCache lets several readers of the same stored values (the
// clustermesh server's syncers, each watching the applied objects) decode
// each value once: Decode of a key's value equal, byte for byte, to the
// one last decoded for that key returns the same objects. They are shared
// and must not be modified. It holds the last value of each key until
// Forget. The zero value is ready; it is safe for concurrent use.
type DecodeCache struct {
	mu sync.Mutex
	m  map[string]decodedValue
}

type decodedValue struct {
	raw  []byte
	objs []Object
	err  error
}

// Decode is Decode(raw) for the value raw of key.
func (c *DecodeCache) Decode(key string, raw []byte) ([]Object, error) {
	if c == nil {
		return Decode(raw)
	}
	c.mu.Lock()
	d, ok := c.m[key]
	c.mu.Unlock()
	if ok && bytes.Equal(d.raw, raw) {
		return d.objs, d.err
	}
	objs, err := Decode(raw)
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]decodedValue{}
	}
	c.m[key] = decodedValue{raw: raw, objs: objs, err: err}
	c.mu.Unlock()
	return objs, err
}

// Forget drops what is kept for key (it was deleted).
func (c *DecodeCache) Forget(key string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	delete(c.m, key)
	c.mu.Unlock()
}
