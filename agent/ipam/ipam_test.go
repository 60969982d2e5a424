package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	v4CIDR = netip.MustParsePrefix("10.244.1.0/29") // usable .2-.6
	v6CIDR = netip.MustParsePrefix("fd00:244:1::/126")
)

func addrs(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func newTestIPAM(t *testing.T, cidrs ...netip.Prefix) (*IPAM, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ipam.json")
	a, err := New(path, cidrs...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return a, path
}

// A host prefix is an external workload's own address: the agent starts,
// and no pod gets an address from it.
func TestHostPrefixHandsOutNothing(t *testing.T) {
	a, _ := newTestIPAM(t, netip.MustParsePrefix("10.0.0.7/32"), netip.MustParsePrefix("fd00::7/128"))
	if _, err := a.Allocate("default/p"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate from a host prefix = %v, want ErrExhausted", err)
	}
}

func TestNewValidation(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name  string
		cidrs []netip.Prefix
		want  string
	}{
		{"none", nil, "no CIDR configured"},
		{"invalid", []netip.Prefix{{}}, "invalid CIDR"},
		{"host bits", []netip.Prefix{p("10.0.0.1/24")}, "CIDR 10.0.0.1/24 has host bits set, use 10.0.0.0/24"},
		{"two v4", []netip.Prefix{p("10.0.0.0/24"), p("10.1.0.0/24")}, "same family"},
		{"two v6", []netip.Prefix{p("fd00::/64"), p("10.0.0.0/24"), p("fd01::/64")}, "same family"},
		{"v4 /31", []netip.Prefix{p("10.0.0.0/31")}, "too small"},
		{"v6 /127", []netip.Prefix{p("fd00::/127")}, "too small"},
		{"mapped", []netip.Prefix{p("::ffff:10.0.0.0/120")}, "IPv4-mapped"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(filepath.Join(t.TempDir(), "s"), tt.cidrs...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v, want containing %q", err, tt.want)
			}
		})
	}
	if _, err := New("", v4CIDR); err == nil {
		t.Error("New with empty path: want error")
	}
}

func TestAllocateSkipsReserved(t *testing.T) {
	tests := []struct {
		name string
		cidr string
		want []string // every address handed out before exhaustion, in order
	}{
		{"v4 /30", "10.0.0.0/30", []string{"10.0.0.2"}},
		{"v4 /29", "10.0.0.8/29", []string{"10.0.0.10", "10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"}},
		{"v6 /126", "fd00::/126", []string{"fd00::2", "fd00::3"}},
		{"v6 /125", "fd00::8/125", []string{"fd00::a", "fd00::b", "fd00::c", "fd00::d", "fd00::e", "fd00::f"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cidr := netip.MustParsePrefix(tt.cidr)
			a, _ := newTestIPAM(t, cidr)
			var got []string
			for i := 0; ; i++ {
				ips, err := a.Allocate(fmt.Sprint("pod", i))
				if err != nil {
					if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), cidr.String()) {
						t.Fatalf("exhaustion error %q does not name CIDR %s", err, cidr)
					}
					break
				}
				if len(ips) != 1 {
					t.Fatalf("got %v, want one address", ips)
				}
				got = append(got, ips[0].String())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("handed out %v, want %v", got, tt.want)
			}
		})
	}
}

func TestAllocateDualStack(t *testing.T) {
	a, _ := newTestIPAM(t, v6CIDR, v4CIDR)
	if got := a.CIDRs(); !slices.Equal(got, []netip.Prefix{v6CIDR, v4CIDR}) {
		t.Errorf("CIDRs = %v", got)
	}
	got, err := a.Allocate("pod-a")
	if err != nil {
		t.Fatal(err)
	}
	if want := addrs("fd00:244:1::2", "10.244.1.2"); !slices.Equal(got, want) {
		t.Errorf("Allocate = %v, want %v (CIDR order)", got, want)
	}
	if _, err := a.Allocate("pod-a"); !errors.Is(err, ErrAllocated) {
		t.Errorf("second Allocate for the same owner = %v, want ErrAllocated", err)
	}
	if _, err := a.Allocate(""); err == nil {
		t.Error("Allocate with empty owner: want error")
	}
	if _, err := a.Allocate("pod-b"); err != nil {
		t.Fatal(err)
	}
	// The IPv6 /126 has two usable addresses: the third owner fails as a
	// whole and takes no IPv4 address either.
	_, err = a.Allocate("pod-c")
	if !errors.Is(err, ErrExhausted) || !strings.Contains(err.Error(), v6CIDR.String()) {
		t.Fatalf("third Allocate = %v, want %s exhausted", err, v6CIDR)
	}
	if _, ok := a.Get("pod-c"); ok {
		t.Error("failed allocation left an owner behind")
	}
	if n := len(a.Allocations()); n != 2 {
		t.Errorf("%d allocations, want 2", n)
	}
	// The IPv4 cursor did not move: after freeing an IPv6 address the next
	// IPv4 address is .4.
	if err := a.Release("pod-a"); err != nil {
		t.Fatal(err)
	}
	got, err = a.Allocate("pod-c")
	if err != nil {
		t.Fatal(err)
	}
	if want := addrs("fd00:244:1::2", "10.244.1.4"); !slices.Equal(got, want) {
		t.Errorf("Allocate = %v, want %v", got, want)
	}
}

func TestReleaseAndRoundRobin(t *testing.T) {
	a, _ := newTestIPAM(t, v4CIDR)
	first, _ := a.Allocate("a")
	if err := a.Release("a"); err != nil {
		t.Fatal(err)
	}
	if err := a.Release("a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Release of unknown owner = %v, want ErrNotFound", err)
	}
	if _, ok := a.Get("a"); ok {
		t.Error("Get after Release found the owner")
	}
	var order []netip.Addr
	for i := range 5 {
		ips, err := a.Allocate(fmt.Sprint("p", i))
		if err != nil {
			t.Fatal(err)
		}
		order = append(order, ips[0])
	}
	// The released .2 comes last, after a full round.
	if want := addrs("10.244.1.3", "10.244.1.4", "10.244.1.5", "10.244.1.6", "10.244.1.2"); !slices.Equal(order, want) {
		t.Errorf("order %v, want %v", order, want)
	}
	if order[4] != first[0] {
		t.Errorf("the released address %v was not the last one handed out", first[0])
	}
}

func TestGetAndAllocationsAreCopies(t *testing.T) {
	a, _ := newTestIPAM(t, v4CIDR)
	ips, _ := a.Allocate("a")
	ips[0] = netip.MustParseAddr("1.2.3.4")
	got, ok := a.Get("a")
	if !ok || got[0].String() != "10.244.1.2" {
		t.Errorf("Get = %v, %v", got, ok)
	}
	got[0] = netip.MustParseAddr("1.2.3.4")
	all := a.Allocations()
	all["a"][0] = netip.MustParseAddr("1.2.3.4")
	all["x"] = nil
	if again, _ := a.Get("a"); again[0].String() != "10.244.1.2" {
		t.Error("caller changed internal state")
	}
	if _, ok := a.Get("x"); ok {
		t.Error("caller added an owner")
	}
}

func TestLargeIPv6(t *testing.T) {
	cidr := netip.MustParsePrefix("2001:db8:0:1::/64")
	a, _ := newTestIPAM(t, cidr)
	seen := map[netip.Addr]bool{}
	for i := range 300 {
		ips, err := a.Allocate(fmt.Sprint("pod", i))
		if err != nil {
			t.Fatal(err)
		}
		if seen[ips[0]] || !cidr.Contains(ips[0]) {
			t.Fatalf("bad or duplicate address %v", ips[0])
		}
		seen[ips[0]] = true
	}
	if !seen[netip.MustParseAddr("2001:db8:0:1::2")] || seen[netip.MustParseAddr("2001:db8:0:1::1")] {
		t.Error("first host address handed out, or ::2 not used")
	}
}

func TestWrapAtEndOfIPv6Range(t *testing.T) {
	a, _ := newTestIPAM(t, netip.MustParsePrefix("fd00::/64"))
	a.pools[0].cursor = netip.MustParseAddr("fd00::ffff:ffff:ffff:fffe")
	ips, _ := a.Allocate("a")
	ips2, _ := a.Allocate("b")
	if ips[0].String() != "fd00::ffff:ffff:ffff:ffff" || ips2[0].String() != "fd00::2" {
		t.Errorf("got %v then %v, want the last address then a wrap to ::2", ips, ips2)
	}
}

func TestPersistence(t *testing.T) {
	a, path := newTestIPAM(t, v4CIDR, v6CIDR)
	pa, _ := a.Allocate("a")
	a.Allocate("b")
	if err := a.Release("b"); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %o, want 600", fi.Mode().Perm())
	}

	b, err := New(path, v4CIDR, v6CIDR)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	got, ok := b.Get("a")
	if !ok || !slices.Equal(got, pa) {
		t.Errorf("after reopen Get(a) = %v, %v; want %v", got, ok, pa)
	}
	// The cursor survived: b's released IPv4 address is not next. (The
	// IPv6 /126 has only b's address free.)
	pc, _ := b.Allocate("c")
	if want := addrs("10.244.1.4", "fd00:244:1::3"); !slices.Equal(pc, want) {
		t.Errorf("after reopen Allocate = %v, want %v", pc, want)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want 1 (temp files left?)", len(entries))
	}
}

func TestOutsideCIDRs(t *testing.T) {
	v6CIDR := netip.MustParsePrefix("fd00:244:1::/64")
	a, path := newTestIPAM(t, v4CIDR, v6CIDR)
	a.Allocate("a")
	a.Allocate("b")

	// The node's IPv4 CIDR changed; the IPv6 one stayed.
	newV4 := netip.MustParsePrefix("10.244.9.0/24")
	b, err := New(path, newV4, v6CIDR)
	if !errors.Is(err, ErrOutsideCIDRs) {
		t.Fatalf("New = %v, want ErrOutsideCIDRs", err)
	}
	for _, want := range []string{"a=10.244.1.2", "b=10.244.1.3", "10.244.9.0/24"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "fd00:244:1::2") {
		t.Errorf("error %q names an address that is still inside", err)
	}
	if b == nil {
		t.Fatal("New returned no IPAM with ErrOutsideCIDRs")
	}
	// Kept, and releasable.
	if got, ok := b.Get("a"); !ok || len(got) != 2 {
		t.Errorf("Get(a) = %v, %v", got, ok)
	}
	if got, err := b.Allocate("c"); err != nil || got[0].String() != "10.244.9.2" {
		t.Fatalf("Allocate from new CIDR = %v, %v", got, err)
	}
	if err := b.Release("a"); err != nil {
		t.Fatal(err)
	}
	if err := b.Release("b"); err != nil {
		t.Fatal(err)
	}
	if _, err := New(path, newV4, v6CIDR); err != nil {
		t.Errorf("after releasing the stale owners New = %v", err)
	}
}

func TestCorruptStateFile(t *testing.T) {
	tests := []struct{ name, content, want string }{
		{"not json", "{", "unexpected EOF"},
		{"empty", "", "EOF"},
		{"unknown field", `{"version":1,"allocations":{},"cursors":{},"x":1}`, "unknown field"},
		{"version", `{"version":2,"allocations":{},"cursors":{}}`, "version 2"},
		{"bad address", `{"version":1,"allocations":{"a":["10.0.0"]},"cursors":{}}`, "10.0.0"},
		{"empty address", `{"version":1,"allocations":{"a":[""]},"cursors":{}}`, `owner "a": invalid address`},
		{"no addresses", `{"version":1,"allocations":{"a":[]},"cursors":{}}`, `owner "a" has no addresses`},
		{"empty owner", `{"version":1,"allocations":{"":["10.244.1.2"]},"cursors":{}}`, "empty owner"},
		{"duplicate", `{"version":1,"allocations":{"a":["10.244.1.2"],"b":["10.244.1.2"]},"cursors":{}}`, `address 10.244.1.2 belongs to both "a" and "b"`},
		{"trailing", `{"version":1,"allocations":{},"cursors":{}}x`, "trailing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ipam.json")
			os.WriteFile(path, []byte(tt.content), 0o600)
			a, err := New(path, v4CIDR)
			if a != nil || err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("New = %v, %v; want error naming the file and containing %q", a, err, tt.want)
			}
		})
	}
}

func TestSaveFailureRollsBack(t *testing.T) {
	a, path := newTestIPAM(t, v4CIDR)
	if _, err := a.Allocate("a"); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(path)
	os.RemoveAll(dir)
	os.WriteFile(dir, nil, 0o600) // a file where the directory was: writes fail
	if _, err := a.Allocate("b"); err == nil {
		t.Fatal("Allocate with unwritable state: want error")
	}
	if err := a.Release("a"); err == nil {
		t.Fatal("Release with unwritable state: want error")
	}
	all := a.Allocations()
	if len(all) != 1 || all["a"][0].String() != "10.244.1.2" {
		t.Errorf("state changed despite failed saves: %v", all)
	}
	if a.pools[0].cursor.String() != "10.244.1.2" {
		t.Errorf("cursor moved despite failed save: %v", a.pools[0].cursor)
	}
}

func TestConcurrent(t *testing.T) {
	a, path := newTestIPAM(t, netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("fd00::/64"))
	const workers, each = 8, 20
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				owner := fmt.Sprintf("w%d-%d", w, i)
				if _, err := a.Allocate(owner); err != nil {
					t.Error(err)
					return
				}
				if i%2 == 0 {
					if err := a.Release(owner); err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	all := a.Allocations()
	if len(all) != workers*each/2 {
		t.Fatalf("%d allocations, want %d", len(all), workers*each/2)
	}
	seen := map[netip.Addr]string{}
	for owner, ips := range all {
		for _, ip := range ips {
			if other, dup := seen[ip]; dup {
				t.Fatalf("%v handed to both %s and %s", ip, owner, other)
			}
			seen[ip] = owner
		}
	}
	b, err := New(path, a.CIDRs()...)
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Allocations()) != len(all) {
		t.Errorf("reopened state has %d allocations, want %d", len(b.Allocations()), len(all))
	}
}

// Allocations made while a write is in progress (pods created together)
// share the next write instead of queueing one write each, and every one
// of them is on disk when its Allocate returns.
func TestConcurrentAllocationsShareWrites(t *testing.T) {
	a, path := newTestIPAM(t, netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("fd00::/64"))
	const n = 10
	a.saveMu.Lock() // a write in progress
	before := a.writes.Load()
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := a.Allocate(fmt.Sprintf("pod%d", i))
			errs <- err
		}()
	}
	for len(a.Allocations()) < n { // all of them in memory, waiting for the write
		runtime.Gosched()
	}
	select {
	case err := <-errs:
		t.Fatalf("an Allocate returned before any write covered it: %v", err)
	default:
	}
	a.saveMu.Unlock()
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if w := a.writes.Load() - before; w != 1 {
		t.Errorf("%d allocations made together took %d writes, want 1", n, w)
	}
	b, err := New(path, a.CIDRs()...)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(b.Allocations()); got != n {
		t.Errorf("the state file holds %d allocations, want %d", got, n)
	}
}

// AllocateAsync hands out the addresses before their write; durable waits
// for it (one write, the same result for every call), and a failed write
// takes them back.
func TestAllocateAsync(t *testing.T) {
	a, path := newTestIPAM(t, v4CIDR)
	a.saveMu.Lock() // a write in progress: the allocation's waits
	addrs, durable, err := a.AllocateAsync("a")
	if err != nil || len(addrs) != 1 || addrs[0].String() != "10.244.1.2" {
		t.Fatalf("AllocateAsync: %v, %v", addrs, err)
	}
	done := make(chan error, 2)
	go func() { done <- durable() }()
	go func() { done <- durable() }()
	select {
	case err := <-done:
		t.Fatalf("durable returned before the write: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	before := a.writes.Load()
	a.saveMu.Unlock()
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if err := durable(); err != nil || a.writes.Load()-before != 1 {
		t.Fatalf("durable again: %v; %d writes, want 1", err, a.writes.Load()-before)
	}
	if b, err := New(path, v4CIDR); err != nil || len(b.Allocations()) != 1 {
		t.Fatalf("the state file after durable: %v, %v", b.Allocations(), err)
	}

	dir := filepath.Dir(path)
	os.RemoveAll(dir)
	os.WriteFile(dir, nil, 0o600) // a file where the directory was: writes fail
	addrs, durable, err = a.AllocateAsync("b")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Get("b"); !ok {
		t.Fatal("b's addresses are not taken before the write")
	}
	if err := durable(); err == nil {
		t.Fatal("durable with an unwritable state file: want an error")
	}
	if _, ok := a.Get("b"); ok {
		t.Errorf("b still holds %v after its write failed", addrs)
	}
}

// The state file, written from each owner's entry kept since its change,
// is what encoding/json writes for the whole state, after any sequence of
// allocations and releases, and reads back the same after a reopen.
func TestStateFileAsEncodingJSON(t *testing.T) {
	a, path := newTestIPAM(t, netip.MustParsePrefix("10.244.0.0/24"), netip.MustParsePrefix("fd00:244::/120"))
	rng := rand.New(rand.NewPCG(5, 6))
	for step := range 150 {
		owner := fmt.Sprintf("ns-%d/pod-%d", rng.IntN(3), rng.IntN(20))
		if _, ok := a.Get(owner); ok {
			if err := a.Release(owner); err != nil {
				t.Fatal(err)
			}
		} else if _, err := a.Allocate(owner); err != nil {
			t.Fatal(err)
		}
		if step%10 == 0 { // reopened: the entries are rebuilt from the file
			b, err := New(path, a.CIDRs()...)
			if err != nil {
				t.Fatal(err)
			}
			checkEncoding(t, b)
		}
		checkEncoding(t, a)
	}
}

func checkEncoding(t *testing.T, a *IPAM) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	st := state{Version: stateVersion, Allocations: a.owners, Cursors: map[string]netip.Addr{}}
	for _, p := range a.pools {
		if p.cursor.IsValid() {
			st.Cursors[p.prefix.String()] = p.cursor
		}
	}
	want, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	got, err := a.encode()
	if err != nil || string(got) != string(want)+"\n" {
		t.Fatalf("state file:\n%s\nencoding/json:\n%s\n(%v)", got, want, err)
	}
}
