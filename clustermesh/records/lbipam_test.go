package records

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestLBAssignment(t *testing.T) {
	r := LBAssignment{Namespace: "shop", Name: "web", Addresses: []LBAddress{
		{IP: netip.MustParseAddr("192.0.2.1"), Pool: "blue"},
		{IP: netip.MustParseAddr("2001:db8::1"), Pool: "blue", Kept: "pool blue no longer covers it"},
	}}
	raw, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	key := LBIPAMKey("shop", "web")
	if key != "isthmus/state/lbipam/v1/shop/web" {
		t.Fatalf("key %q", key)
	}
	got, err := ValidateLBAssignment(key, raw)
	if err != nil || len(got.Addresses) != 2 || got.Addresses[1].Kept == "" {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := ValidateLBAssignment(LBIPAMKey("shop", "api"), raw); !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "holds the assignment of shop/web") {
		t.Errorf("key mismatch: %v", err)
	}
	bad := map[string]string{
		"not json":      `{`,
		"no version":    `{"namespace":"shop","name":"web"}`,
		"newer version": `{"version":2,"namespace":"shop","name":"web"}`,
		"unknown field": `{"version":1,"namespace":"shop","name":"web","extra":1}`,
		"bad ip":        `{"version":1,"namespace":"shop","name":"web","addresses":[{"ip":"300.1.1.1","pool":"p"}]}`,
		"two of family": `{"version":1,"namespace":"shop","name":"web","addresses":[{"ip":"192.0.2.1","pool":"p"},{"ip":"192.0.2.2","pool":"p"}]}`,
		"mapped v4":     `{"version":1,"namespace":"shop","name":"web","addresses":[{"ip":"::ffff:192.0.2.1","pool":"p"}]}`,
		"multicast":     `{"version":1,"namespace":"shop","name":"web","addresses":[{"ip":"224.0.0.1","pool":"p"}]}`,
		"bad pool":      `{"version":1,"namespace":"shop","name":"web","addresses":[{"ip":"192.0.2.1","pool":"P/x"}]}`,
		"no pool":       `{"version":1,"namespace":"shop","name":"web","addresses":[{"ip":"192.0.2.1"}]}`,
		"bad name":      `{"version":1,"namespace":"shop","name":"Web"}`,
		"huge refusal":  `{"version":1,"namespace":"shop","name":"web","refused":"` + strings.Repeat("x", 5000) + `"}`,
	}
	for name, v := range bad {
		if _, err := ValidateLBAssignment(key, []byte(v)); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want a malformed-record error", name, err)
		}
	}
	for _, k := range []string{"isthmus/state/lbipam/v1/shop", "isthmus/state/lbipam/v1/Shop/web", "isthmus/state/lbipam/v1/shop/web/x", "isthmus/state/services/v1/shop/web"} {
		if _, _, err := ParseLBIPAMKey(k); err == nil {
			t.Errorf("key %q accepted", k)
		}
	}
}
