package records

import (
	"bytes"
	"math"
	"net/netip"
)

// A mirror decodes every ipcache entry of a remote cluster (100,000 of
// them in a full sync), and the general strict decoder (encoding/json,
// twice: version first, then the record with unknown fields refused) was
// the largest part of its cost. Nearly every value in etcd is exactly what
// IPCacheEntry.Marshal wrote, so that one spelling is read directly:
// decodeIPCacheCanonical accepts only the canonical encoding — the fields
// in the struct's order and spelling, no white space, plain decimal
// numbers, strings of printable ASCII without escapes, nothing after the
// object — and reports ok=false for anything else, which then goes
// through the strict decoder. Whatever it accepts, the strict decoder
// decodes to the same value (TestIPCacheCanonicalMatchesStrict and
// FuzzIPCacheCanonical check that), so the fast path changes the cost,
// never the outcome; Validate runs on both paths.

// canonReader reads one canonical JSON object.
type canonReader struct {
	b []byte
	i int
}

// lit consumes s if the input continues with it.
func (r *canonReader) lit(s string) bool {
	if len(r.b)-r.i < len(s) || string(r.b[r.i:r.i+len(s)]) != s {
		return false
	}
	r.i += len(s)
	return true
}

// str reads a string of printable ASCII without escapes (the opening
// quote included).
func (r *canonReader) str() (string, bool) {
	if r.i >= len(r.b) || r.b[r.i] != '"' {
		return "", false
	}
	start := r.i + 1
	end := bytes.IndexByte(r.b[start:], '"')
	if end < 0 {
		return "", false
	}
	s := r.b[start : start+end]
	for _, c := range s {
		// Escapes, control characters (invalid JSON) and non-ASCII
		// (encoding/json replaces invalid UTF-8) are the strict decoder's.
		if c < 0x20 || c >= 0x7f || c == '\\' {
			return "", false
		}
	}
	r.i = start + end + 1
	return string(s), true
}

// uint32 reads a plain decimal number: no sign, fraction, exponent or
// leading zero, at most math.MaxUint32.
func (r *canonReader) uint32() (uint32, bool) {
	start := r.i
	var v uint64
	for r.i < len(r.b) && r.b[r.i] >= '0' && r.b[r.i] <= '9' {
		v = v*10 + uint64(r.b[r.i]-'0')
		r.i++
		if r.i-start > 10 {
			return 0, false
		}
	}
	n := r.i - start
	if n == 0 || (n > 1 && r.b[start] == '0') || v > math.MaxUint32 {
		return 0, false
	}
	return uint32(v), true
}

// decodeIPCacheCanonical decodes the canonical encoding of an ipcache
// entry (see above); ok is false for any other input. The entry is not
// validated.
func decodeIPCacheCanonical(data []byte) (e IPCacheEntry, ok bool) {
	r := canonReader{b: data}
	if !r.lit(`{"version":`) {
		return e, false
	}
	v, ok := r.uint32()
	if !ok || v != CurrentVersion {
		return e, false // the strict decoder says what is wrong
	}
	e.Version = int(v)
	if !r.lit(`,"prefix":`) {
		return e, false
	}
	s, ok := r.str()
	if !ok || s == "" {
		return e, false
	}
	if e.Prefix, ok = parsePrefix(s); !ok {
		return e, false
	}
	if !r.lit(`,"identity":`) {
		return e, false
	}
	if e.Identity, ok = r.uint32(); !ok {
		return e, false
	}
	if r.lit(`,"hostIP":`) {
		if s, ok = r.str(); !ok || s == "" {
			return e, false
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return e, false
		}
		e.HostIP = a
	}
	if r.lit(`,"ownerName":`) {
		if e.OwnerName, ok = r.str(); !ok {
			return e, false
		}
	}
	if r.lit(`,"ownerNamespace":`) {
		if e.OwnerNamespace, ok = r.str(); !ok {
			return e, false
		}
	}
	if !r.lit(`,"cluster":`) {
		return e, false
	}
	if e.Cluster, ok = r.str(); !ok {
		return e, false
	}
	if !r.lit(`}`) || r.i != len(data) {
		return e, false
	}
	return e, true
}

func parsePrefix(s string) (netip.Prefix, bool) {
	p, err := netip.ParsePrefix(s)
	return p, err == nil
}
