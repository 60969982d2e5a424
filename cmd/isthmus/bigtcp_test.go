package main

import (
	"bytes"
	"regexp"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// The BIG TCP section of `isthmus status`: the setting, a row per path and
// family with why not, the external devices, each endpoint.
func TestPrintBigTCP(t *testing.T) {
	var out bytes.Buffer
	err := printBigTCP(&out, &api.BigTCPStatus{IPv6: "auto", IPv4: "on", Size: 196608, IPv4Supported: true,
		Paths: []api.BigTCPPath{
			{Path: api.BigTCPPathSameNode, Family: "ipv6", On: true},
			{Path: api.BigTCPPathWireGuard, Family: "ipv6", Reason: "isthwg1 (tso_max_size 65536)"},
		},
		Devices: []api.BigTCPDevice{
			{Name: "eth0", Role: "underlay,outside", TSOMax: 524280, GSO: 196608, GRO: 196608, GSOIPv4: 196608, GROIPv4: 196608},
			{Name: "isthabc", Role: "pod-host", Endpoint: "default/web", GSO: 196608},
		},
		Endpoints: []api.EndpointBigTCP{{Endpoint: "default/web", IPv6: 196608, IPv4: 65536, Reason: "eth0: refused"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", out.String())
	for _, want := range []string{
		`(?m)^BIG TCP: ipv6 auto, ipv4 on, size 196608$`,
		`(?m)^  same-node\s+ipv6\s+on\s+<none>$`,
		`(?m)^  cross-node-wireguard\s+ipv6\s+off\s+isthwg1 \(tso_max_size 65536\)$`,
		`(?m)^  eth0\s+underlay,outside\s+524280\s+196608/196608\s+196608/196608\s+<none>$`,
		`(?m)^  default/web\s+196608\s+65536\s+eth0: refused$`,
	} {
		if !regexp.MustCompile(want).Match(out.Bytes()) {
			t.Errorf("no line matching %s", want)
		}
	}
	if bytes.Contains(out.Bytes(), []byte("isthabc")) {
		t.Error("pod veths are listed among the devices")
	}
}
