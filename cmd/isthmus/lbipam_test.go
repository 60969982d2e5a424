package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// lbBackend serves a LoadBalancer service with assigned addresses, one
// refused, and a pool with its usage, as an agent fills them in.
type lbBackend struct{ api.Backend }

const (
	lbWebJSON = `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default"},` +
		`"spec":{"vips":["10.96.0.10"],"ports":[{"port":80,"protocol":"TCP"}],"type":"LoadBalancer"},` +
		`"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.0","pool":"blue"}]}}}`
	lbTakenJSON = `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"taken","namespace":"default"},` +
		`"spec":{"vips":["10.96.0.11"],"ports":[{"port":80,"protocol":"TCP"}],"type":"LoadBalancer","loadBalancerIPs":["192.0.2.0"]},` +
		`"status":{"loadBalancer":{"refused":"loadBalancerIP 192.0.2.0 is in use by service default/web"}}}`
	lbPoolJSON = `{"apiVersion":"isthmus.io/v1alpha1","kind":"LoadBalancerIPPool","metadata":{"name":"blue","namespace":"default"},` +
		`"spec":{"blocks":[{"cidr":"192.0.2.0/28"},{"start":"2001:db8::1","stop":"2001:db8::f"}],"serviceSelector":{"matchLabels":{"tier":"web"}}},` +
		`"status":{"total":"31","used":1}}`
)

func (lbBackend) ListObjects(_ context.Context, kind string) ([]api.Object, error) {
	switch kind {
	case "Service":
		return []api.Object{
			{Kind: "Service", Namespace: "default", Name: "taken", Object: json.RawMessage(lbTakenJSON)},
			{Kind: "Service", Namespace: "default", Name: "web", Object: json.RawMessage(lbWebJSON)},
		}, nil
	case "LoadBalancerIPPool":
		return []api.Object{{Kind: "LoadBalancerIPPool", Namespace: "default", Name: "blue", Object: json.RawMessage(lbPoolJSON)}}, nil
	}
	return nil, nil
}

func TestGetLoadBalancer(t *testing.T) {
	sock := serveFake(t, lbBackend{})
	out, err := run(t, sock, "", "get", "svc")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"EXTERNAL-IP", "192.0.2.0\n", "<refused>"} {
		if !strings.Contains(out, want) {
			t.Errorf("get svc: no %q in\n%s", want, out)
		}
	}
	out, err = run(t, sock, "", "get", "service", "taken", "-o", "yaml")
	if err != nil || !strings.Contains(out, "refused: loadBalancerIP 192.0.2.0 is in use by service default/web") {
		t.Errorf("get service taken -o yaml: %v\n%s", err, out)
	}
	out, err = run(t, sock, "", "get", "service", "web", "-o", "json")
	if err != nil || !strings.Contains(out, `"ip": "192.0.2.0"`) || !strings.Contains(out, `"pool": "blue"`) {
		t.Errorf("get service web -o json: %v\n%s", err, out)
	}
	out, err = run(t, sock, "", "get", "pools")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"USED", "TOTAL", "blue", "192.0.2.0-192.0.2.15,2001:db8::1-2001:db8::f", "tier=web", "false", " 1 ", "31"} {
		if !strings.Contains(out, want) {
			t.Errorf("get pools: no %q in\n%s", want, out)
		}
	}
}
