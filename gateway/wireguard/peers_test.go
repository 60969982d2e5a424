package wireguard

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func newKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func TestValidatePeers(t *testing.T) {
	self, a, b := newKey(t), newKey(t), newKey(t)
	ep := netip.MustParseAddrPort("192.0.2.1:51871")
	cases := []struct {
		name  string
		peers []Peer
		bad   []string // keys named in the error; nil means valid
		want  string   // substring of the error
	}{
		{"empty", nil, nil, ""},
		{"good", []Peer{
			{PublicKey: a.String(), Endpoint: ep, AllowedIPs: pfx("10.1.0.0/24", "fd00:1::/64")},
			{PublicKey: b.String(), AllowedIPs: pfx("10.2.0.0/24", "10.1.0.0/16")}, // overlap is fine, same prefix is not
		}, nil, ""},
		{"invalid key", []Peer{{PublicKey: "not-a-key"}, {PublicKey: a.String()}}, []string{"not-a-key"}, "invalid public key"},
		{"zero key", []Peer{{PublicKey: wgtypes.Key{}.String()}}, []string{wgtypes.Key{}.String()}, "invalid public key"},
		{"duplicate key", []Peer{{PublicKey: a.String()}, {PublicKey: b.String()}, {PublicKey: a.String()}}, []string{a.String()}, "listed 2 times"},
		{"own key", []Peer{{PublicKey: self.String()}}, []string{self.String()}, "own public key"},
		{"endpoint without port", []Peer{{PublicKey: a.String(), Endpoint: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 0)}}, []string{a.String()}, "no port"},
		{"negative keepalive", []Peer{{PublicKey: a.String(), PersistentKeepalive: -time.Second}}, []string{a.String()}, "keepalive"},
		{"invalid prefix", []Peer{{PublicKey: a.String(), AllowedIPs: []netip.Prefix{{}}}}, []string{a.String()}, "invalid allowed IP"},
		{"prefix on two peers", []Peer{
			{PublicKey: a.String(), AllowedIPs: pfx("10.1.0.0/24")},
			{PublicKey: b.String(), AllowedIPs: pfx("10.1.0.7/24")},
		}, []string{b.String()}, "also given to peer"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := validatePeers(tc.peers, self)
			if tc.bad == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			var ipe *InvalidPeersError
			if !errors.As(err, &ipe) {
				t.Fatalf("want *InvalidPeersError, got %v", err)
			}
			if !slices.Equal(ipe.Keys(), tc.bad) {
				t.Errorf("named keys %q, want %q", ipe.Keys(), tc.bad)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q lacks %q", err, tc.want)
			}
			for _, k := range tc.bad {
				if !strings.Contains(err.Error(), k) {
					t.Errorf("error %q does not name %q", err, k)
				}
			}
		})
	}
}

func TestPlanPeers(t *testing.T) {
	a, b, c, d := newKey(t), newKey(t), newKey(t), newKey(t)
	ep := func(s string) *net.UDPAddr { return net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s)) }
	have := []wgtypes.Peer{
		// a: unchanged (device reports IPv4 as a 4-in-6 endpoint, prefixes in another order)
		{PublicKey: a, Endpoint: &net.UDPAddr{IP: net.ParseIP("192.0.2.1"), Port: 51871},
			AllowedIPs: ipNets(pfx("fd00:1::/64", "10.1.0.0/24")), PersistentKeepaliveInterval: 25 * time.Second},
		// b: AllowedIPs change, endpoint roamed but the wanted one is unset
		{PublicKey: b, Endpoint: ep("198.51.100.9:4000"), AllowedIPs: ipNets(pfx("10.2.0.0/24"))},
		// c: stale
		{PublicKey: c, AllowedIPs: ipNets(pfx("10.3.0.0/24"))},
	}
	want, err := validatePeers([]Peer{
		{PublicKey: a.String(), Endpoint: netip.MustParseAddrPort("192.0.2.1:51871"), AllowedIPs: pfx("10.1.0.0/24", "fd00:1::/64"), PersistentKeepalive: 25 * time.Second},
		{PublicKey: b.String(), AllowedIPs: pfx("10.2.0.0/24", "10.22.0.0/24")},
		{PublicKey: d.String(), Endpoint: netip.MustParseAddrPort("[2001:db8::4]:51871"), AllowedIPs: pfx("10.4.0.0/24")},
	}, newKey(t))
	if err != nil {
		t.Fatal(err)
	}
	changes := planPeers(have, want)
	got := map[wgtypes.Key]wgtypes.PeerConfig{}
	for _, ch := range changes {
		got[ch.PublicKey] = ch
	}
	if len(changes) != 3 {
		t.Fatalf("want 3 changes (b, c, d), got %d: %+v", len(changes), changes)
	}
	if _, ok := got[a]; ok {
		t.Errorf("unchanged peer a was touched: %+v", got[a])
	}
	if ch := got[b]; !ch.UpdateOnly || !ch.ReplaceAllowedIPs || ch.Endpoint != nil || ch.PersistentKeepaliveInterval != nil ||
		!slices.Equal(prefixesOf(ch.AllowedIPs), pfx("10.2.0.0/24", "10.22.0.0/24")) {
		t.Errorf("peer b: %+v", ch)
	}
	if ch := got[c]; !ch.Remove {
		t.Errorf("stale peer c not removed: %+v", ch)
	}
	if ch := got[d]; ch.Remove || ch.UpdateOnly || ch.Endpoint.String() != "[2001:db8::4]:51871" ||
		!slices.Equal(prefixesOf(ch.AllowedIPs), pfx("10.4.0.0/24")) {
		t.Errorf("new peer d: %+v", ch)
	}

	// Applying the plan leaves nothing to do.
	if again := planPeers([]wgtypes.Peer{have[0]}, want[:1]); len(again) != 0 {
		t.Errorf("second plan not empty: %+v", again)
	}
	// Endpoint and keepalive changes alone do not replace AllowedIPs.
	moved := want[0]
	moved.endpoint = netip.MustParseAddrPort("192.0.2.99:51871")
	moved.keepalive = 0
	ch := planPeers([]wgtypes.Peer{have[0]}, []wantPeer{moved})
	if len(ch) != 1 || ch[0].ReplaceAllowedIPs || ch[0].Endpoint.String() != "192.0.2.99:51871" ||
		ch[0].PersistentKeepaliveInterval == nil || *ch[0].PersistentKeepaliveInterval != 0 {
		t.Errorf("endpoint/keepalive update: %+v", ch)
	}
}

func TestMTUFor(t *testing.T) {
	for _, tc := range []struct {
		underlay int
		v6       bool
		want     int
	}{{1500, false, 1440}, {1500, true, 1420}, {9000, false, 8940}, {9000, true, 8920}, {60, false, 0}, {0, true, 0}} {
		if got := MTUFor(tc.underlay, tc.v6); got != tc.want {
			t.Errorf("MTUFor(%d, %v) = %d, want %d", tc.underlay, tc.v6, got, tc.want)
		}
	}
}

func TestConfigCheck(t *testing.T) {
	ok := Config{Name: "isthmus-wg0", KeyFile: "/x"}
	if err := ok.check(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []Config{
		{Name: "", KeyFile: "/x"},
		{Name: "sixteen-chars-xx", KeyFile: "/x"},
		{Name: "a/b", KeyFile: "/x"},
		{Name: "wg 0", KeyFile: "/x"},
		{Name: "wg0"},
		{Name: "wg0", KeyFile: "/x", ListenPort: 70000},
		{Name: "wg0", KeyFile: "/x", MTU: 100},
		{Name: "wg0", KeyFile: "/x", Mode: "fast"},
	} {
		if err := c.check(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
}

func TestEndpointFor(t *testing.T) {
	a := func(s ...string) []netip.Addr {
		var out []netip.Addr
		for _, x := range s {
			out = append(out, netip.MustParseAddr(x))
		}
		return out
	}
	for _, tc := range []struct {
		local, remote []netip.Addr
		want          string
	}{
		{a("192.0.2.1", "2001:db8::1"), a("2001:db8::2", "192.0.2.2"), "192.0.2.2:51871"},
		{a("2001:db8::1"), a("192.0.2.2", "2001:db8::2"), "[2001:db8::2]:51871"},
		{a("192.0.2.1"), a("2001:db8::2"), ""},
		{a("192.0.2.1", "2001:db8::1"), a("fe80::2", "2001:db8::2"), "[2001:db8::2]:51871"},
		{a("::ffff:192.0.2.1"), a("::ffff:192.0.2.2"), "192.0.2.2:51871"},
		{nil, a("192.0.2.2"), ""},
	} {
		got, ok := EndpointFor(tc.local, tc.remote, DefaultListenPort)
		if (tc.want == "") == ok || (ok && got.String() != tc.want) {
			t.Errorf("EndpointFor(%v, %v) = %v, %v; want %q", tc.local, tc.remote, got, ok, tc.want)
		}
	}
}
