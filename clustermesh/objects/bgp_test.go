package objects

import (
	"strings"
	"testing"
)

const bgpPolicyYAML = `apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata: {name: tor}
spec:
  nodeSelector: {matchLabels: {rack: r1}}
  localASN: 65010
  neighbors:
    - {address: "10.0.0.1", peerASN: 65000, gracefulRestart: {enabled: true}}
    - {address: "fd00:0:0::1", peerASN: 65000, timers: {holdTimeSeconds: 30}}
  advertisements:
    - type: PodCIDR
    - {type: ExternalIP, selector: {matchLabels: {a: b}}, communities: ["65010:1", NO-EXPORT, "1:2:3"], localPreference: 200}
`

func TestDecodeBGPPeeringPolicy(t *testing.T) {
	objs, err := Decode([]byte(bgpPolicyYAML))
	if err != nil {
		t.Fatal(err)
	}
	p := objs[0].(*BGPPeeringPolicy)
	if Key(p) != "BGPPeeringPolicy/default/tor" {
		t.Errorf("key %s", Key(p))
	}
	n0, n1 := p.Spec.Neighbors[0], p.Spec.Neighbors[1]
	if n0.Port != 179 || *n0.Timers.HoldTimeSeconds != 90 || *n0.Timers.KeepaliveTimeSeconds != 30 ||
		*n0.Timers.ConnectRetryTimeSeconds != 5 || n0.GracefulRestart.RestartTimeSeconds != 120 {
		t.Errorf("defaults of neighbor 0: %+v %+v", n0, n0.Timers)
	}
	if n1.Address != "fd00::1" || *n1.Timers.KeepaliveTimeSeconds != 10 || n1.GracefulRestart.RestartTimeSeconds != 0 {
		t.Errorf("neighbor 1: %+v", n1)
	}
	if c := p.Spec.Advertisements[1].Communities[1]; c != "no-export" {
		t.Errorf("community not normalised: %q", c)
	}
}

func TestBGPPeeringPolicyErrors(t *testing.T) {
	for _, c := range []struct{ name, old, new, want string }{
		{"asn 0", "localASN: 65010", "localASN: 0", "spec.localASN: required"},
		{"as_trans", "localASN: 65010", "localASN: 23456", "AS_TRANS"},
		{"asn too big", "localASN: 65010", "localASN: 4294967295", "must be 1-4294967294"},
		{"peer asn", `peerASN: 65000, gracefulRestart`, `peerASN: 0, gracefulRestart`, "spec.neighbors[0].peerASN: required"},
		{"duplicate neighbour", `"fd00:0:0::1"`, `"10.0.0.1"`, "spec.neighbors[1].address: 10.0.0.1 is already listed as spec.neighbors[0]"},
		{"duplicate neighbour other spelling", `"10.0.0.1", peerASN`, `"fd00::1", peerASN`, "spec.neighbors[1].address: fd00::1 is already listed"},
		{"bad address", `"10.0.0.1"`, `"10.0.0"`, `spec.neighbors[0].address: invalid IP address "10.0.0"`},
		{"hold too small", "holdTimeSeconds: 30", "holdTimeSeconds: 2", "must be at least 3"},
		{"hold zero", "holdTimeSeconds: 30", "holdTimeSeconds: 0", "must be at least 3"},
		{"keepalive not below hold", "holdTimeSeconds: 30", "holdTimeSeconds: 30, keepaliveTimeSeconds: 30", "keepaliveTimeSeconds: must be 1 to less than the hold time (30), got 30"},
		{"restart time without gr", "holdTimeSeconds: 30}", "holdTimeSeconds: 30}, gracefulRestart: {restartTimeSeconds: 5}", "needs gracefulRestart.enabled"},
		{"restart time too long", "gracefulRestart: {enabled: true}", "gracefulRestart: {enabled: true, restartTimeSeconds: 4096}", "at most 4095"},
		{"relative password file", "gracefulRestart: {enabled: true}", "passwordFile: pw", "must be an absolute path"},
		{"multihop ibgp", "peerASN: 65000, gracefulRestart", "peerASN: 65010, ebgpMultihopTTL: 3, gracefulRestart", "applies to eBGP only"},
		{"bad type", "type: PodCIDR", "type: PodCidr", `spec.advertisements[0].type: must be PodCIDR, LoadBalancerIP or ExternalIP, got "PodCidr"`},
		{"selector on pod cidr", "type: PodCIDR", "{type: PodCIDR, selector: {matchLabels: {a: b}}}", "not allowed with type PodCIDR"},
		{"bad community", `"65010:1"`, `"65536:1"`, "spec.advertisements[1].communities[0]: standard community"},
		{"bad router id", "localASN: 65010", "localASN: 65010\n  routerID: \"fd00::1\"", "spec.routerID: must be an IPv4"},
		{"namespace", "metadata: {name: tor}", "metadata: {name: tor, namespace: shop}", "leave the namespace out"},
		{"unknown field", "  neighbors:", "  x: 1\n  neighbors:", "spec.x: unknown field"},
		{"bool typed", "gracefulRestart: {enabled: true}", `gracefulRestart: {enabled: "yes"}`, "must be true or false"},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := strings.Replace(bgpPolicyYAML, c.old, c.new, 1)
			if in == bgpPolicyYAML {
				t.Fatalf("mutation %q not applied", c.old)
			}
			_, err := Decode([]byte(in))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want %q", err, c.want)
			}
		})
	}
}

func TestParseCommunity(t *testing.T) {
	std, _, err := ParseCommunity("65010:100")
	if err != nil || *std != 65010<<16|100 {
		t.Errorf("65010:100: %v %v", std, err)
	}
	_, large, err := ParseCommunity("4200000000:1:2")
	if err != nil || *large != [3]uint32{4200000000, 1, 2} {
		t.Errorf("large: %v %v", large, err)
	}
	if std, _, _ := ParseCommunity("blackhole"); *std != 0xFFFF029A {
		t.Errorf("blackhole: %x", *std)
	}
	for _, bad := range []string{"", "1", "a:b", "1:2:3:4", "70000:1", "1:2:4294967296"} {
		if _, _, err := ParseCommunity(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
