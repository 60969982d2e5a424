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
	m  map[string]*decodedValue
}

// decodedValue is one decoded value; done is closed once objs and err
// are set (a reader that comes while another decodes waits for it: the
// syncers see each event at about the same time).
type decodedValue struct {
	raw  []byte
	done chan struct{}
	objs []Object
	err  error
}

// Decode is Decode(raw) for the value raw of key.
func (c *DecodeCache) Decode(key string, raw []byte) ([]Object, error) {
	if c == nil {
		return Decode(raw)
	}
	c.mu.Lock()
	if d, ok := c.m[key]; ok && bytes.Equal(d.raw, raw) {
		c.mu.Unlock()
		<-d.done
		return d.objs, d.err
	}
	d := &decodedValue{raw: raw, done: make(chan struct{})}
	if c.m == nil {
		c.m = map[string]*decodedValue{}
	}
	c.m[key] = d
	c.mu.Unlock()
	d.objs, d.err = Decode(raw)
	close(d.done)
	return d.objs, d.err
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
