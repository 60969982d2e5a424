package records

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"regexp"
	"testing"
)

// sameDecode checks that DecodeIPCacheEntry (canonical fast path first)
// and the strict decoder alone agree on data: same value, same error.
func sameDecode(t *testing.T, data []byte) (fast bool) {
	t.Helper()
	_, fast = decodeIPCacheCanonical(data)
	got, gotErr := DecodeIPCacheEntry(data)
	want, wantErr := decode[IPCacheEntry]("ipcache entry", data)
	if fmt.Sprint(gotErr) != fmt.Sprint(wantErr) || !reflect.DeepEqual(got, want) {
		t.Fatalf("input %q (canonical path: %v):\nfast path: %+v, %v\nstrict:    %+v, %v", data, fast, got, gotErr, want, wantErr)
	}
	return fast
}

func randomEntry(rng *rand.Rand) IPCacheEntry {
	var a netip.Addr
	if rng.IntN(2) == 0 {
		a = netip.AddrFrom4([4]byte{10, byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))})
	} else {
		var b [16]byte
		b[0], b[1] = 0xfd, 0
		for i := 2; i < 16; i++ {
			b[i] = byte(rng.IntN(256))
		}
		a = netip.AddrFrom16(b)
	}
	e := IPCacheEntry{Prefix: netip.PrefixFrom(a, a.BitLen()-rng.IntN(9)).Masked(), Identity: uint32(rng.IntN(1 << 26)), Cluster: "c" + fmt.Sprint(rng.IntN(100))}
	if rng.IntN(3) > 0 {
		e.HostIP = netip.AddrFrom4([4]byte{192, 168, 0, byte(rng.IntN(256))})
	}
	if rng.IntN(2) == 0 {
		e.OwnerName, e.OwnerNamespace = fmt.Sprintf("pod-%d.x", rng.IntN(1000)), "ns"+fmt.Sprint(rng.IntN(9))
	}
	return e
}

// The canonical fast path reads what Marshal writes (else it would be
// dead code) and, on those records and on every mutation of them, gives
// exactly the strict decoder's result.
func TestIPCacheCanonicalMatchesStrict(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, uint64(len(t.Name()))))
	junk := []byte(`\"{}:, 0129aZ-./\` + "\x00\x7f\xc3")
	fastMutants := 0
	for i := range 3000 {
		e := randomEntry(rng)
		enc, err := e.Marshal()
		if err != nil {
			// Reserved or foreign identities are still valid records;
			// only what Validate refuses is skipped.
			continue
		}
		if !sameDecode(t, enc) {
			t.Fatalf("entry %d: Marshal's encoding %s is not read by the canonical path", i, enc)
		}
		for range 20 {
			m := append([]byte(nil), enc...)
			switch pos := rng.IntN(len(m)); rng.IntN(4) {
			case 0:
				m[pos] = junk[rng.IntN(len(junk))]
			case 1:
				m = append(m[:pos], append([]byte{junk[rng.IntN(len(junk))]}, m[pos:]...)...)
			case 2:
				m = append(m[:pos], m[pos+1:]...)
			case 3:
				end := min(len(m), pos+1+rng.IntN(12))
				m = append(m[:end], append(append([]byte(nil), m[pos:end]...), m[end:]...)...)
			}
			if sameDecode(t, m) {
				fastMutants++
			}
		}
	}
	if fastMutants == 0 {
		t.Fatal("no mutant took the canonical path: the comparison covered nothing but the happy path")
	}
	for _, in := range []string{
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":02097153,"cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":4294967296,"cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":4294967295,"cluster":"c2"}`,
		`{"version":2,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"hostIP":"","cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"c\u0032"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"C2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"c2"} `,
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"c2","cluster":"c3"}`,
		`{"Version":1,"prefix":"10.0.0.1/32","identity":2097153,"cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/8","identity":2097153,"ownerName":"","cluster":"c2"}`,
		`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"ownerName":"Bad_Name","cluster":"c2"}`,
	} {
		sameDecode(t, []byte(in))
	}
}

func FuzzIPCacheCanonical(f *testing.F) {
	f.Add(mustMarshal(f, testIP))
	f.Add([]byte(`{"version":1,"prefix":"10.0.0.1/32","identity":2097153,"hostIP":"10.1.0.1","ownerName":"a","ownerNamespace":"b","cluster":"c2"}`))
	f.Fuzz(func(t *testing.T, data []byte) { sameDecode(t, data) })
}

// The hand-written name checks accept exactly what the regular
// expressions they replace accept.
func TestNameChecksMatchRegexps(t *testing.T) {
	dnsLabel := regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	labelName := regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
	check := func(s string) {
		if got, want := isDNSLabel(s), dnsLabel.MatchString(s); got != want {
			t.Fatalf("isDNSLabel(%q) = %v, the regexp says %v", s, got, want)
		}
		if got, want := isLabelName(s), labelName.MatchString(s); got != want {
			t.Fatalf("isLabelName(%q) = %v, the regexp says %v", s, got, want)
		}
	}
	const alphabet = "aZ09-_./\n\xc3"
	var gen func(prefix string, n int)
	gen = func(prefix string, n int) {
		check(prefix)
		if n == 0 {
			return
		}
		for i := 0; i < len(alphabet); i++ {
			gen(prefix+alphabet[i:i+1], n-1)
		}
	}
	gen("", 4)
	rng := rand.New(rand.NewPCG(5, 7))
	for range 20000 {
		b := make([]byte, 1+rng.IntN(20))
		for i := range b {
			b[i] = byte(rng.IntN(128))
		}
		check(string(b))
	}
}
