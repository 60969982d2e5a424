package objects

import (
	"strings"
	"testing"
)

func pool(spec string) string {
	return "apiVersion: isthmus.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata:\n  name: blue\nspec:\n" + spec
}

func TestDecodePool(t *testing.T) {
	in := pool("  blocks:\n  - cidr: 192.0.2.0/28\n  - start: 2001:db8::10\n    stop: 2001:db8::1f\n"+
		"  serviceSelector:\n    matchLabels: {tier: web}\n  disabled: true\n") +
		"status: {used: 3, total: \"99\"}\n"
	objs, err := Decode([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	p := objs[0].(*LoadBalancerIPPool)
	if p.Metadata.Namespace != DefaultNamespace || Key(p) != "LoadBalancerIPPool/default/blue" {
		t.Fatalf("namespace %q, key %q", p.Metadata.Namespace, Key(p))
	}
	if !p.Spec.Disabled || !p.Spec.ServiceSelector.Matches(map[string]string{"tier": "web"}) {
		t.Fatalf("spec = %+v", p.Spec)
	}
	if p.Status.Used != 0 || p.Status.Total != "" {
		t.Fatalf("status survived Decode: %+v", p.Status)
	}
	rs := p.Ranges()
	if len(rs) != 2 || rs[0].String() != "192.0.2.0-192.0.2.15" || rs[1].String() != "2001:db8::10-2001:db8::1f" {
		t.Fatalf("ranges %v", rs)
	}
	if got := p.TotalAddresses().String(); got != "32" {
		t.Fatalf("total %s, want 32", got)
	}
	// The biggest blocks allowed.
	if _, err := Decode([]byte(pool("  blocks: [{cidr: 10.0.0.0/8}, {cidr: 2001:db8::/64}, {start: 11.0.0.0, stop: 11.255.255.255}]\n"))); err != nil {
		t.Fatalf("largest blocks refused: %v", err)
	}
}

func TestDecodePoolErrors(t *testing.T) {
	tests := []struct{ name, input, want string }{
		{"no blocks", pool("  blocks: []\n"), "spec.blocks: must list at least one block"},
		{"bad cidr", pool("  blocks: [{cidr: 192.0.2.0/33}]\n"), `spec.blocks[0]: cidr: invalid CIDR "192.0.2.0/33"`},
		{"host bits", pool("  blocks: [{cidr: 192.0.2.1/24}]\n"), `host bits set, did you mean 192.0.2.0/24?`},
		{"slash zero", pool("  blocks: [{cidr: 0.0.0.0/0}]\n"), `spec.blocks[0]: cidr: "0.0.0.0": unspecified address`},
		{"too large v4", pool("  blocks: [{cidr: 10.0.0.0/7}]\n"), "spec.blocks[0]: cidr: 10.0.0.0/7 is too large: at most a /8 per block"},
		{"too large v6", pool("  blocks: [{cidr: 2001:db8::/48}]\n"), "cidr: 2001:db8::/48 is too large: at most a /64"},
		{"v6 slash zero", pool("  blocks: [{cidr: \"::/0\"}]\n"), "unspecified address"},
		{"multicast", pool("  blocks: [{cidr: 224.0.0.0/24}]\n"), "multicast address"},
		{"both forms", pool("  blocks: [{cidr: 192.0.2.0/24, start: 192.0.2.1, stop: 192.0.2.2}]\n"), "either cidr or start and stop, not both"},
		{"start only", pool("  blocks: [{start: 192.0.2.1}]\n"), "needs cidr, or start and stop"},
		{"start after stop", pool("  blocks: [{start: 192.0.2.9, stop: 192.0.2.1}]\n"), "start 192.0.2.9 is after stop 192.0.2.1"},
		{"mixed families", pool("  blocks: [{start: 192.0.2.1, stop: 2001:db8::1}]\n"), "different families"},
		{"bad start", pool("  blocks: [{start: nope, stop: 192.0.2.1}]\n"), `start: invalid IP address "nope"`},
		{"huge range", pool("  blocks: [{start: 10.0.0.0, stop: 11.0.0.0}]\n"), "is too large"},
		{"blocks overlap", pool("  blocks: [{cidr: 192.0.2.0/24}, {start: 192.0.2.200, stop: 192.0.3.5}]\n"),
			"spec.blocks[1]: 192.0.2.200-192.0.3.5 overlaps spec.blocks[0] (192.0.2.0-192.0.2.255)"},
		{"namespace", "apiVersion: isthmus.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: blue, namespace: prod}\nspec:\n  blocks: [{cidr: 192.0.2.0/24}]\n",
			`metadata.namespace: a LoadBalancerIPPool is cluster-scoped`},
		{"disabled not bool", pool("  blocks: [{cidr: 192.0.2.0/24}]\n  disabled: \"yes\"\n"), `spec.disabled: must be true or false, got "yes"`},
		{"bad selector", pool("  blocks: [{cidr: 192.0.2.0/24}]\n  serviceSelector: {matchExpressions: [{key: a, operator: Has}]}\n"),
			"spec.serviceSelector.matchExpressions[0].operator"},
		{"unknown field", pool("  blocks: [{cidr: 192.0.2.0/24}]\n  allowFirstLastIPs: true\n"), "spec.allowFirstLastIPs: unknown field"},
		{"unknown block field", pool("  blocks: [{prefix: 192.0.2.0/24}]\n"), "spec.blocks[0].prefix: unknown field"},
		{"unknown kind lists pool", "apiVersion: isthmus.io/v1alpha1\nkind: IPPool\n", "must be Service, NetworkPolicy, LoadBalancerIPPool"},
		{"lb ip of a family without vip", "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  vips: [10.0.0.1]\n  ports: [{port: 80}]\n  type: LoadBalancer\n  loadBalancerIPs: [2001:db8::1]\n",
			"spec.loadBalancerIPs[0]: 2001:db8::1 is IPv6 but spec.vips has no IPv6 address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode([]byte(tt.input))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Decode error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestCheckPoolOverlap(t *testing.T) {
	mk := func(name string, blocks ...PoolBlock) LoadBalancerIPPool {
		return LoadBalancerIPPool{APIVersion: APIVersion, Kind: KindLoadBalancerIPPool,
			Metadata: Meta{Name: name, Namespace: DefaultNamespace}, Spec: LoadBalancerIPPoolSpec{Blocks: blocks}}
	}
	a := mk("a", PoolBlock{CIDR: "192.0.2.0/28"}, PoolBlock{CIDR: "2001:db8::/120"})
	b := mk("b", PoolBlock{Start: "192.0.2.15", Stop: "192.0.2.20"})
	err := CheckPoolOverlap([]LoadBalancerIPPool{a}, b)
	if err == nil || !strings.Contains(err.Error(), "LoadBalancerIPPool b: block 192.0.2.15-192.0.2.20 overlaps block 192.0.2.0-192.0.2.15 of LoadBalancerIPPool a") {
		t.Fatalf("overlap: %v", err)
	}
	// Adjacent, other family, or the same pool replaced: no conflict.
	for _, p := range []LoadBalancerIPPool{
		mk("b", PoolBlock{Start: "192.0.2.16", Stop: "192.0.2.20"}),
		mk("b", PoolBlock{CIDR: "2001:db8::100/120"}),
		mk("a", PoolBlock{CIDR: "192.0.2.0/24"}),
	} {
		if err := CheckPoolOverlap([]LoadBalancerIPPool{a}, p); err != nil {
			t.Errorf("%+v: %v", p.Spec.Blocks, err)
		}
	}
}
