package lbipamsync_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
)

const waitFor = 30 * time.Second

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// apply writes objects as `isthmus apply` stores them.
func apply(t *testing.T, kv *kvstore.Client, yaml string) {
	t.Helper()
	objs, err := objects.Decode([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		raw, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		if err := kv.Put(context.Background(), records.ConfigPrefix+objects.Key(o), raw); err != nil {
			t.Fatal(err)
		}
	}
}

func remove(t *testing.T, kv *kvstore.Client, key string) {
	t.Helper()
	if err := kv.Delete(context.Background(), records.ConfigPrefix+key); err != nil {
		t.Fatal(err)
	}
}

func poolYAML(name, spec string) string {
	return "---\napiVersion: isthmus.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: " + name + "}\nspec:\n" + spec
}

func svcYAML(name, vips string, request ...string) string {
	s := "---\napiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: " + name + "}\nspec:\n  vips: [" + vips + "]\n  ports: [{port: 80}]\n  type: LoadBalancer\n"
	if len(request) > 0 {
		s += "  loadBalancerIPs: [" + strings.Join(request, ", ") + "]\n"
	}
	return s
}

// record reads the assignment of default/name ("" addresses: none).
func record(kv *kvstore.Client, name string) (records.LBAssignment, int64, error) {
	key := records.LBIPAMKey("default", name)
	v, found, err := kv.Get(context.Background(), key)
	if err != nil {
		return records.LBAssignment{}, 0, err
	}
	if !found {
		return records.LBAssignment{}, 0, fmt.Errorf("%s: no record", key)
	}
	r, err := records.ValidateLBAssignment(key, v.Value)
	return r, v.ModRevision, err
}

func addrs(r records.LBAssignment) string {
	var out []string
	for _, a := range r.Addresses {
		s := a.IP.String() + "@" + a.Pool
		if a.Kept != "" {
			s += "!"
		}
		out = append(out, s)
	}
	return strings.Join(out, ",")
}

// expect waits until default/name's record has the addresses want and a
// refusal containing refused ("" none).
func expect(t *testing.T, kv *kvstore.Client, name, want, refused string) records.LBAssignment {
	t.Helper()
	var r records.LBAssignment
	servertest.Eventually(t, waitFor, "assignment of "+name, func() error {
		var err error
		if r, _, err = record(kv, name); err != nil {
			return err
		}
		if got := addrs(r); got != want {
			return fmt.Errorf("addresses %q, want %q (refused %q)", got, want, r.Refused)
		}
		if (refused == "") != (r.Refused == "") || !strings.Contains(r.Refused, refused) {
			return fmt.Errorf("refused %q, want %q", r.Refused, refused)
		}
		return nil
	})
	return r
}

func gone(t *testing.T, kv *kvstore.Client, name string) {
	t.Helper()
	servertest.Eventually(t, waitFor, "record of "+name+" deleted", func() error {
		_, found, err := kv.Get(context.Background(), records.LBIPAMKey("default", name))
		if err == nil && found {
			err = errors.New("still there")
		}
		return err
	})
}

// LB-IPAM in a real server: allocation in both families, requests honoured
// or refused with the reason, an address that stays across a pool edit
// and across a server restart, freed addresses, a malformed record
// rewritten, metrics; and a node's credential cannot write assignments.
func TestServerLBIPAM(t *testing.T) {
	ctx := testCtx(t)
	c := servertest.New(t, "lb1", 41, "10.41.0.0/16")
	c.Config.MetricsListen = "127.0.0.1:0"
	c.Start(t)
	kv := c.KV()

	apply(t, kv, poolYAML("blue", "  blocks: [{cidr: 192.0.2.0/28}, {cidr: \"2001:db8::/124\"}]\n")+
		svcYAML("a", "10.96.0.1")+svcYAML("b", "10.96.0.2, \"fd00::2\"")+
		svcYAML("req", "10.96.0.3", "192.0.2.9")+svcYAML("outside", "10.96.0.5", "198.51.100.1"))
	expect(t, kv, "a", "192.0.2.0@blue", "")
	expect(t, kv, "b", "192.0.2.1@blue,2001:db8::@blue", "")
	expect(t, kv, "req", "192.0.2.9@blue", "")
	// A later request of the same address (clash sorts before req: only
	// stickiness keeps req's) is refused, naming the holder.
	apply(t, kv, svcYAML("clash", "10.96.0.4", "192.0.2.9"))
	expect(t, kv, "clash", "", "loadBalancerIP 192.0.2.9 is in use by service default/req")
	expect(t, kv, "outside", "", "loadBalancerIP 198.51.100.1 is not in any enabled LoadBalancerIPPool that selects the service")

	// a goes: its address is free, b stays where it is.
	remove(t, kv, "Service/default/a")
	gone(t, kv, "a")
	expect(t, kv, "b", "192.0.2.1@blue,2001:db8::@blue", "")

	// A pool edit that no longer covers b's addresses: b keeps them (and
	// says so); a new service applied after it gets an address of the new
	// block. (Both in one apply: TestPoolEditAndServiceInOneApply.)
	apply(t, kv, poolYAML("blue", "  blocks: [{cidr: 192.0.2.64/28}, {cidr: \"2001:db8::100/124\"}]\n"))
	b := expect(t, kv, "b", "192.0.2.1@blue!,2001:db8::@blue!", "")
	if !strings.Contains(b.Addresses[0].Kept, "pool blue no longer covers it") {
		t.Errorf("kept note %q", b.Addresses[0].Kept)
	}
	apply(t, kv, svcYAML("c", "10.96.0.6"))
	expect(t, kv, "c", "192.0.2.64@blue", "")
	// The pool is put back: b's addresses are the pool's again.
	apply(t, kv, poolYAML("blue", "  blocks: [{cidr: 192.0.2.0/28}, {cidr: \"2001:db8::/124\"}]\n"))
	expect(t, kv, "b", "192.0.2.1@blue,2001:db8::@blue", "")
	expect(t, kv, "c", "192.0.2.64@blue!", "")
	_, bRev, _ := record(kv, "b")

	// Metrics: used and total per pool, refused services (the counts are
	// taken just after the write the records show, so poll).
	servertest.Eventually(t, waitFor, "LB-IPAM metrics", func() error {
		fams, err := promtest.Get(nil, "http://"+c.API().MetricsAddr()+"/metrics")
		if err != nil {
			return err
		}
		for name, want := range map[string]float64{
			"isthmus_clustermesh_lbipam_pool_used_addresses":  4, // b (2), req, c (kept)
			"isthmus_clustermesh_lbipam_pool_total_addresses": 32,
			"isthmus_clustermesh_lbipam_pool_kept_addresses":  1,
		} {
			if got, _ := fams.Value(name, "pool", "blue"); got != want {
				return fmt.Errorf("%s = %v, want %v", name, got, want)
			}
		}
		if got, _ := fams.Value("isthmus_clustermesh_lbipam_refused_services"); got != 2 {
			return fmt.Errorf("refused services %v, want 2", got)
		}
		return nil
	})

	// A restart reads the stored assignments: b keeps 192.0.2.1 although
	// 192.0.2.0 is lower and free, and its record is not even rewritten.
	c.Stop()
	c.Start(t)
	kv = c.KV()
	apply(t, kv, svcYAML("d", "10.96.0.7"))
	expect(t, kv, "d", "192.0.2.0@blue", "")
	expect(t, kv, "b", "192.0.2.1@blue,2001:db8::@blue", "")
	if _, rev, _ := record(kv, "b"); rev != bRev {
		t.Errorf("b's record was rewritten by the restart (revision %d -> %d)", bRev, rev)
	}

	// A malformed record never stops the rest: at a service's key it is
	// replaced, at a key of no service deleted; the others stay.
	if err := kv.Put(ctx, records.LBIPAMKey("default", "d"), []byte(`{"version":1,"bogus":true}`)); err != nil {
		t.Fatal(err)
	}
	if err := kv.Put(ctx, records.LBIPAMKey("default", "nobody"), []byte(`not json`)); err != nil {
		t.Fatal(err)
	}
	expect(t, kv, "d", "192.0.2.0@blue", "")
	gone(t, kv, "nobody")
	expect(t, kv, "b", "192.0.2.1@blue,2001:db8::@blue", "")
	servertest.Eventually(t, waitFor, "invalid records counted", func() error {
		if n := c.API().LBIPAM.Stats().Invalid; n < 2 {
			return fmt.Errorf("invalid %d, want >= 2", n)
		}
		return nil
	})

	// A service that stops being LoadBalancer loses its record.
	apply(t, kv, "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: d}\nspec: {vips: [10.96.0.7], ports: [{port: 80}]}\n")
	gone(t, kv, "d")

	// Only the server writes assignments: a node's credential is refused.
	bundle, err := c.API().Server.ExportNodeBundle(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	kc, err := bundle.KVConfig()
	if err != nil {
		t.Fatal(err)
	}
	kc.Logger = servertest.Logger()
	node, err := kvstore.Connect(ctx, kc)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	for _, k := range []string{records.LBIPAMKey("default", "b"), records.LBIPAMKey("default", "new")} {
		err := node.Put(ctx, k, []byte(`{"version":1,"namespace":"default","name":"b"}`))
		if !isPermissionDenied(err) {
			t.Errorf("node credential writing %s: %v, want permission denied", k, err)
		}
	}
	if err := node.Delete(ctx, records.LBIPAMKey("default", "b")); !isPermissionDenied(err) {
		t.Errorf("node credential deleting b's record: %v, want permission denied", err)
	}
	// It may read them (agents fill the services' status from them).
	if _, found, err := node.Get(ctx, records.LBIPAMKey("default", "b")); err != nil || !found {
		t.Errorf("node credential reading b's record: found %v, %v", found, err)
	}
}

func isPermissionDenied(err error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if errors.Is(rpctypes.Error(e), rpctypes.ErrPermissionDenied) {
			return true
		}
	}
	return false
}

// applyTxn writes objects as `isthmus apply` does in cluster mode: in one
// transaction, in key order (meshsync.WriteConfig).
func applyTxn(t *testing.T, kv *kvstore.Client, yaml string) {
	t.Helper()
	objs, err := objects.Decode([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(objs, func(a, b objects.Object) int { return strings.Compare(objects.Key(a), objects.Key(b)) })
	var ops []kvstore.Op
	for _, o := range objs {
		raw, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		ops = append(ops, kvstore.OpPut(records.ConfigPrefix+objects.Key(o), raw))
	}
	if _, err := kv.Txn(context.Background(), nil, ops); err != nil {
		t.Fatal(err)
	}
}

// A pool edit and a new service in one apply (one transaction): the
// service gets an address of the pool as edited, never of the pool as it
// was. Rounds, because a syncer that saw the service before the pool
// (a watch per kind did, some of the time) fails only now and then.
func TestPoolEditAndServiceInOneApply(t *testing.T) {
	c := servertest.New(t, "lb2", 42, "10.42.0.0/16")
	c.Start(t)
	kv := c.KV()
	apply(t, kv, poolYAML("blue", "  blocks: [{cidr: 10.50.0.0/28}]\n")+svcYAML("s00", "10.96.1.0"))
	expect(t, kv, "s00", "10.50.0.0@blue", "")
	for i := 1; i <= 20; i++ {
		name := fmt.Sprintf("s%02d", i)
		applyTxn(t, kv, poolYAML("blue", fmt.Sprintf("  blocks: [{cidr: 10.50.%d.0/28}]\n", i))+svcYAML(name, fmt.Sprintf("10.96.1.%d", i)))
		expect(t, kv, name, fmt.Sprintf("10.50.%d.0@blue", i), "")
	}
}
