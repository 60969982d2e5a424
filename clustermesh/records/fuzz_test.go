package records

import (
	"bytes"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

// Every decoder of remote data is fuzzed: it must never panic, and what it
// accepts must survive Marshal and decode unchanged (so a record we accept
// is one we would have written ourselves).

type marshaler interface{ Marshal() ([]byte, error) }

func fuzzDecoder[T marshaler](f *testing.F, decode func([]byte) (T, error), seeds ...[]byte) {
	for _, s := range seeds {
		f.Add(s)
	}
	for _, s := range []string{"", "{}", "null", `{"version":1}`, `{"version":2}`, `{"version":1,"x":1}`, "[]", `"x"`, "{\"version\":1}\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		v, err := decode(data)
		if err != nil {
			return
		}
		enc, err := v.Marshal()
		if err != nil {
			t.Fatalf("decoded value does not marshal: %v\ninput: %q", err, data)
		}
		v2, err := decode(enc)
		if err != nil {
			t.Fatalf("re-decoding our own encoding failed: %v\nencoding: %s", err, enc)
		}
		enc2, err := v2.Marshal()
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding not stable:\n%s\n%s (%v)", enc, enc2, err)
		}
	})
}

func FuzzDecodeNode(f *testing.F) {
	fuzzDecoder(f, DecodeNode, mustMarshal(f, testNode),
		[]byte(`{"version":1,"name":"n","cluster":"c","clusterID":1,"ips":["10.0.0.1"]}`),
		[]byte(`{"version":1,"name":"n","cluster":"c","clusterID":1,"ips":["fe80::1%eth0"]}`),
		[]byte(`{"version":1,"name":"n","cluster":"c","clusterID":1,"ips":[""],"labels":{"":""}}`))
}

func FuzzDecodeIPCache(f *testing.F) {
	fuzzDecoder(f, DecodeIPCacheEntry, mustMarshal(f, testIP),
		[]byte(`{"version":1,"prefix":"0.0.0.0/0","identity":2,"cluster":"c"}`),
		[]byte(`{"version":1,"prefix":"fd00::/8","identity":1048577,"hostIP":"","cluster":"c"}`),
		[]byte(`{"version":1,"prefix":"10.0.0.1/8","identity":0,"cluster":"c"}`))
}

func FuzzDecodeService(f *testing.F) {
	fuzzDecoder(f, DecodeService, mustMarshal(f, testService),
		[]byte(`{"version":1,"name":"s","namespace":"n","cluster":"c","clusterID":1,"frontends":[{"ip":"10.0.0.1","port":53,"protocol":"UDP"}]}`),
		[]byte(`{"version":1,"name":"s","namespace":"n","cluster":"c","clusterID":1,"frontends":[{"ip":"10.0.0.1","port":53,"protocol":"UDP"}],"backends":[{"ip":"10.0.0.2","port":53,"protocol":"UDP","cluster":"d"}]}`))
}

func FuzzDecodeClusterConfig(f *testing.F) {
	fuzzDecoder(f, DecodeClusterConfig, mustMarshal(f, testConfig),
		[]byte(`{"version":1,"name":"c","id":4095,"podCIDRs":[]}`),
		[]byte(`{"version":1,"name":"c","id":1,"podCIDRs":["10.0.0.0/8","10.1.0.0/16"]}`))
}

func FuzzDecodeIdentity(f *testing.F) {
	fuzzDecoder(f, DecodeIdentity, mustMarshal(f, testIdentity),
		[]byte(`{"version":1,"id":255,"labels":{"a":"b"}}`))
}

func FuzzDecodeIdentityRef(f *testing.F) {
	fuzzDecoder(f, DecodeIdentityRef, mustMarshal(f, IdentityRef{ID: 1<<20 | 1}),
		[]byte(`{"version":1,"id":4294967295}`))
}

// FuzzParseKeys: key parsers never panic, and an accepted key is rebuilt
// exactly by its builder.
func FuzzParseKeys(f *testing.F) {
	for _, s := range []string{
		NodeKey("c1", "n1"), IPCacheKey("c1", "n1", testIP.Prefix), ServiceKey("c1", "ns", "s"),
		IdentityIDKey(1<<20 | 1), IdentityValueKey("a=1,isthmus.io/cluster=c1", "n1"),
		IdentityLabelsKey("a=1"), SyncedKey("c1", KindIP), ClusterConfigKey("c1"),
		"isthmus/cache/ip/v1/c1/n1/10.0.0.0/8", "isthmus/state/ip/v1/c1/n1/::1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		if c, n, err := ParseNodeKey(key); err == nil && NodeKey(c, n) != key {
			t.Fatalf("node key %q rebuilt as %q", key, NodeKey(c, n))
		}
		if c, n, p, err := ParseIPCacheKey(key); err == nil && IPCacheKey(c, n, p) != key {
			t.Fatalf("ip key %q rebuilt as %q", key, IPCacheKey(c, n, p))
		}
		if c, ns, n, err := ParseServiceKey(key); err == nil && ServiceKey(c, ns, n) != key {
			t.Fatalf("service key %q rebuilt", key)
		}
		if id, err := ParseIdentityIDKey(key); err == nil && IdentityIDKey(id) != key {
			t.Fatalf("identity key %q rebuilt", key)
		}
		if l, n, err := ParseIdentityValueKey(key); err == nil && IdentityValueKey(l, n) != key {
			t.Fatalf("value key %q rebuilt", key)
		}
		if c, k, err := ParseSyncedKey(key); err == nil && SyncedKey(c, k) != key {
			t.Fatalf("synced key %q rebuilt", key)
		}
		if c, err := ParseClusterConfigKey(key); err == nil && ClusterConfigKey(c) != key {
			t.Fatalf("config key %q rebuilt", key)
		}
		if s, c, err := StateKey(key); err == nil {
			if back, err := CacheKey(s, c); err != nil || back != key {
				t.Fatalf("cache key %q -> %q -> %q (%v)", key, s, back, err)
			}
		}
	})
}

// decode's canonical fast path gives, for what it takes, what the strict
// decoder gives, for every record type.
func FuzzDecodeCanonicalMatchesStrict(f *testing.F) {
	lb := LBAssignment{Namespace: "default", Name: "s", Addresses: []LBAddress{{IP: netip.MustParseAddr("192.0.2.1"), Pool: "p", Kept: "k"}}, Refused: "r"}
	for _, m := range []marshaler{testNode, testIP, testService, testConfig, testIdentity, IdentityRef{ID: 1<<20 | 1}, lb, Stamp{Cluster: "c", Time: time.Date(2026, 12, 6, 12, 0, 0, 5, time.UTC)}} {
		raw := mustMarshal(f, m)
		f.Add(raw)
		f.Add(bytes.Replace(raw, []byte(`"version"`), []byte(`"Version"`), 1))
		f.Add(bytes.Replace(raw, []byte(`{"version":1`), []byte(`{"version":1,"version":1`), 1))
		f.Add(bytes.Replace(raw, []byte(`{"version":1`), []byte(`{"version":2`), 1))
		f.Add(append(bytes.Clone(raw), ' '))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkCanonical[Node](t, data)
		checkCanonical[IPCacheEntry](t, data)
		checkCanonical[ServiceRecord](t, data)
		checkCanonical[ClusterConfig](t, data)
		checkCanonical[IdentityRecord](t, data)
		checkCanonical[IdentityRef](t, data)
		checkCanonical[LBAssignment](t, data)
		checkCanonical[Stamp](t, data)
	})
}

func checkCanonical[T validator](t *testing.T, data []byte) {
	t.Helper()
	v, ok := decodeCanonical[T](data)
	if !ok {
		return
	}
	want, err := decodeStrict[T]("record", data)
	if err != nil {
		t.Fatalf("%T: the canonical path took what the strict decoder refuses (%v): %q", v, err, data)
	}
	if !reflect.DeepEqual(v, want) {
		t.Fatalf("%T: canonical %#v, strict %#v", v, v, want)
	}
}
