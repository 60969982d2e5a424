package enroll_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/isthmus-mesh/isthmus/clustermesh/enroll"
	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

// A real clustermesh server (embedded etcd with mutual TLS and auth) with
// its enrollment endpoint, and what a host needs to enroll.
type fixture struct {
	c   *servertest.Cluster
	url string
	fp  string
}

func setup(t *testing.T) fixture {
	t.Helper()
	c := servertest.New(t, "c1", 1, "10.1.0.0/16", "fd00:1::/48")
	c.Config.Enroll = server.EnrollConfig{Listen: "127.0.0.1:0",
		VMCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.200.0/24"), netip.MustParsePrefix("fd00:1:0:c8::/64")}}
	c.Start(t)
	fp, err := c.API().Server.CAFingerprint()
	if err != nil {
		t.Fatal(err)
	}
	return fixture{c: c, url: "https://" + c.API().EnrollAddr(), fp: fp}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func (f fixture) apply(t *testing.T, name, spec string) {
	t.Helper()
	w, err := objects.DecodeExternalWorkload([]byte(fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: ExternalWorkload
metadata:
  name: %s
  labels: {app: db}
%s`, name, spec)))
	if err != nil {
		t.Fatal(err)
	}
	if err := enroll.Apply(ctxT(t), f.c.KV(), w); err != nil {
		t.Fatal(err)
	}
}

func (f fixture) token(t *testing.T, name string, ttl time.Duration) string {
	t.Helper()
	tok, _, err := enroll.CreateToken(ctxT(t), f.c.KV(), "c1", name, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// join enrolls with a fresh key and returns the enrollment and the key.
func (f fixture) join(t *testing.T, token, fp string) (*enroll.Enrollment, []byte, error) {
	t.Helper()
	key, csr, err := enroll.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	e, err := enroll.Join(ctxT(t), f.url, token, fp, enroll.EnrollRequest{CSR: string(csr)})
	return e, key, err
}

// client connects to the cluster's etcd with an enrolled host's credential.
func (f fixture) client(t *testing.T, e *enroll.Enrollment, key []byte) *kvstore.Client {
	t.Helper()
	b := etcdserver.Bundle{Cluster: e.Cluster, ClusterID: e.ClusterID, Endpoints: e.Endpoints, User: e.User,
		CACert: []byte(e.CACert), Cert: []byte(e.Cert), Key: key}
	kc, err := b.KVConfig()
	if err != nil {
		t.Fatal(err)
	}
	kc.Logger = servertest.Logger()
	kc.MaxRetries = 1
	c, err := kvstore.Connect(ctxT(t), kc)
	if err != nil {
		t.Fatalf("connect as %s: %v", e.User, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func denied(err error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if errors.Is(rpctypes.Error(e), rpctypes.ErrPermissionDenied) || errors.Is(rpctypes.Error(e), rpctypes.ErrUserNotFound) {
			return true
		}
	}
	return err != nil && strings.Contains(err.Error(), "permission denied")
}

// unchanged asserts that a refused enrollment left nothing behind: the
// workload not enrolled, no address claimed, no node record.
func (f fixture) unchanged(t *testing.T, name string) {
	t.Helper()
	ctx := ctxT(t)
	w, rev, err := enroll.Get(ctx, f.c.KV(), name)
	if err != nil || rev == 0 {
		t.Fatalf("workload %s: rev %d, %v", name, rev, err)
	}
	if w.Status.Enrolled || len(w.Status.Addresses) > 0 {
		t.Errorf("a refused enrollment changed the status: %+v", w.Status)
	}
	kvs, _, err := f.c.KV().GetPrefix(ctx, enroll.AddressesPrefix)
	if err != nil || len(kvs) > 0 {
		t.Errorf("a refused enrollment claimed addresses: %d, %v", len(kvs), err)
	}
	if _, found, _ := f.c.KV().Get(ctx, records.NodeKey("c1", enroll.NodeName(name))); found {
		t.Error("a refused enrollment left a node record")
	}
}

func TestEnrollIssuesAnIdentityThatWritesOnlyItsOwnRecords(t *testing.T) {
	f := setup(t)
	ctx := ctxT(t)
	f.apply(t, "db1", "spec: {ipv4: 10.1.200.50}")
	e, key, err := f.join(t, f.token(t, "db1", time.Minute), f.fp)
	if err != nil {
		t.Fatal(err)
	}
	if e.Node != "vm-db1" || e.User != "node-vm-db1.1" || e.Cluster != "c1" || e.ClusterID != 1 {
		t.Errorf("enrollment %+v", e)
	}
	want := []netip.Addr{netip.MustParseAddr("10.1.200.50"), netip.MustParseAddr("fd00:1:0:c8::2")}
	if fmt.Sprint(e.Addresses) != fmt.Sprint(want) {
		t.Errorf("addresses %v, want %v (requested IPv4, allocated IPv6)", e.Addresses, want)
	}
	block, _ := pem.Decode([]byte(e.Cert))
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != "spiffe://isthmus.io/cluster/c1/vm/db1" {
		t.Errorf("certificate URIs %v, want the SPIFFE ID", cert.URIs)
	}
	w, _, _ := enroll.Get(ctx, f.c.KV(), "db1")
	if !w.Status.Enrolled || !w.Status.CertificateExpiry.Equal(cert.NotAfter.UTC()) || w.Status.LastSeen.IsZero() {
		t.Errorf("status %+v", w.Status)
	}

	vm := f.client(t, e, key)
	// Valid records (the server's guard cuts off a host whose records do
	// not match its enrollment, see below).
	own := uint32(1<<20 | 500)
	v, _ := records.IdentityRecord{ID: own, Labels: map[string]string{"app": "db", "isthmus.io/namespace": "default", "isthmus.io/cluster": "c1"}}.Marshal()
	if err := f.c.KV().Put(ctx, records.IdentityIDKey(own), v); err != nil {
		t.Fatal(err)
	}
	putNode(t, vm, e, netip.PrefixFrom(e.Addresses[0], 32), netip.PrefixFrom(e.Addresses[1], 128))
	putIP(t, vm, e, e.Addresses[0], own)
	if err := vm.Put(ctx, records.IdentityIDKey(1<<20|400), []byte("x")); err != nil {
		t.Errorf("the host writing an identity: %v", err)
	}
	for _, k := range []string{records.NodeKey("c1", "c1-n1"), records.NodeIPCachePrefix("c1", "c1-n1") + "10.1.1.5",
		records.ConfigPrefix + "NetworkPolicy/default/x", records.ClusterConfigKey("c1"), enroll.WorkloadKey("db1"),
		enroll.TokensPrefix + "x", etcdserver.RemoteKey("c2")} {
		if err := vm.Put(ctx, k, []byte("x")); !denied(err) {
			t.Errorf("the host writing %s = %v, want permission denied", k, err)
		}
	}
	if _, _, err := vm.Get(ctx, enroll.TokensPrefix); !denied(err) {
		t.Errorf("the host reading token hashes = %v, want permission denied", err)
	}

	// Renewal with the current certificate.
	tc, err := tls.X509KeyPair([]byte(e.Cert), key)
	if err != nil {
		t.Fatal(err)
	}
	_, csr, _ := enroll.NewKey()
	r, err := enroll.Renew(ctx, f.url, "c1", f.fp, tc, csr)
	if err != nil {
		t.Fatalf("renew: %v", err)
	}
	if r.Cert == e.Cert || r.User != e.User {
		t.Error("renewal did not issue a new certificate of the same user")
	}

	// Revocation: the credential stops working, the records go, renewal
	// is refused, and the token is not usable again.
	if err := enroll.Revoke(ctx, f.c.KV(), "c1", "db1"); err != nil {
		t.Fatal(err)
	}
	if err := vm.Put(ctx, records.NodeKey("c1", "vm-db1"), []byte("y")); !denied(err) {
		t.Errorf("the revoked host writing its node record = %v, want refused", err)
	}
	if _, found, _ := f.c.KV().Get(ctx, records.NodeKey("c1", "vm-db1")); found {
		t.Error("the node record survived the revocation")
	}
	if kvs, _, _ := f.c.KV().GetPrefix(ctx, records.NodeIPCachePrefix("c1", "vm-db1")); len(kvs) > 0 {
		t.Error("ipcache entries survived the revocation")
	}
	if _, err := enroll.Renew(ctx, f.url, "c1", f.fp, tc, csr); err == nil || !strings.Contains(err.Error(), "not enrolled") {
		t.Errorf("renewal after revocation = %v, want refused", err)
	}

	// Enrolled again under the same name (and deleted and created again):
	// the revoked enrollment's certificate stays dead, since each
	// enrollment has an etcd user of its own.
	for round, again := range []func(){
		func() {},
		func() {
			if err := enroll.Delete(ctx, f.c.KV(), "c1", "db1"); err != nil {
				t.Fatal(err)
			}
			f.apply(t, "db1", "spec: {ipv4: 10.1.200.50}")
		},
	} {
		again()
		e2, key2, err := f.join(t, f.token(t, "db1", time.Minute), f.fp)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("node-vm-db1.%d", round+2); e2.User != want {
			t.Errorf("user of enrollment %d: %s, want %s", round+2, e2.User, want)
		}
		vm2 := f.client(t, e2, key2)
		putNode(t, vm2, e2, netip.PrefixFrom(e2.Addresses[0], 32), netip.PrefixFrom(e2.Addresses[1], 128))
		if err := vm.Put(ctx, records.NodeKey("c1", "vm-db1"), []byte("y")); !denied(err) {
			t.Errorf("round %d: the revoked enrollment's credential writing = %v, want refused", round, err)
		}
		if _, err := enroll.Renew(ctx, f.url, "c1", f.fp, tc, csr); err == nil || !strings.Contains(err.Error(), "earlier enrollment") {
			t.Errorf("round %d: renewal with the revoked enrollment's certificate = %v, want refused", round, err)
		}
		if err := enroll.Revoke(ctx, f.c.KV(), "c1", "db1"); err != nil {
			t.Fatal(err)
		}
		vm = vm2
	}
}

// Every bad token is refused with a clear error and changes nothing.
func TestBadTokensAreRefusedAndChangeNothing(t *testing.T) {
	f := setup(t)
	f.apply(t, "db1", "")
	good := f.token(t, "db1", time.Minute)
	other, _ := enroll.NewToken("c2", "db1")
	forged, _ := enroll.NewToken("c1", "db1")
	expired := f.token(t, "db1", time.Second)
	time.Sleep(1100 * time.Millisecond)
	cases := []struct {
		name, token, fp, want string
	}{
		{"forged", forged, f.fp, "unknown token"},
		{"other cluster", other, f.fp, `the token is for cluster "c2"`},
		{"expired", expired, f.fp, "token expired"},
		{"malformed", "ivm1.c1.db1.short", f.fp, "malformed token"},
		{"wrong CA fingerprint", good, strings.Repeat("ab", 32), "does not match the pinned fingerprint"},
		{"bad fingerprint", good, "xyz", "CA fingerprint"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := f.join(t, tc.token, tc.fp)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("join = %v, want an error containing %q", err, tc.want)
			}
			f.unchanged(t, "db1")
		})
	}
	// The good token still works (the wrong fingerprint did not spend it)
	// and then never again.
	if _, _, err := f.join(t, good, f.fp); err != nil {
		t.Fatalf("the good token after the refusals: %v", err)
	}
	if _, _, err := f.join(t, good, f.fp); err == nil || !strings.Contains(err.Error(), "token already used") {
		t.Fatalf("replayed token = %v, want already used", err)
	}
}

// A token is spent by exactly one of many concurrent enrollments, and a
// second token of an enrolled workload is refused.
func TestTokenIsSingleUseUnderConcurrency(t *testing.T) {
	f := setup(t)
	f.apply(t, "db1", "")
	tok := f.token(t, "db1", time.Minute)
	second := f.token(t, "db1", time.Minute)
	// In process, so that the requests really overlap (over HTTPS the
	// handshakes spread them out).
	svc, err := enroll.New(enroll.Config{Cluster: "c1", ClusterID: 1, PodCIDRs: f.c.Config.Server.PodCIDRs,
		VMCIDRs: f.c.Config.Enroll.VMCIDRs, KV: f.c.KV(), Issuer: f.c.API().Server})
	if err != nil {
		t.Fatal(err)
	}
	_, csr, _ := enroll.NewKey()
	var wg sync.WaitGroup
	var mu sync.Mutex
	start := make(chan struct{})
	ok, errs := 0, []string{}
	for range 16 {
		wg.Go(func() {
			<-start
			_, _, err := svc.Enroll(ctxT(t), enroll.EnrollRequest{Token: tok, CSR: string(csr)})
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				ok++
			} else {
				errs = append(errs, err.Error())
			}
		})
	}
	close(start)
	wg.Wait()
	if ok != 1 {
		t.Fatalf("%d enrollments with one token succeeded, want 1 (errors: %v)", ok, errs)
	}
	if _, _, err := f.join(t, second, f.fp); err == nil || !strings.Contains(err.Error(), "already enrolled") {
		t.Fatalf("second token of an enrolled workload = %v, want already enrolled", err)
	}
	if _, _, err := enroll.CreateToken(ctxT(t), f.c.KV(), "c1", "db1", time.Minute); err == nil {
		t.Fatal("a token was created for an enrolled workload")
	}
	if _, _, err := enroll.CreateToken(ctxT(t), f.c.KV(), "c1", "nope", time.Minute); err == nil {
		t.Fatal("a token was created for a workload that does not exist")
	}
	// Tokens are stored hashed: no record holds the token.
	kvs, _, _ := f.c.KV().GetPrefix(ctxT(t), enroll.Prefix)
	for _, kv := range kvs {
		if strings.Contains(kv.Key+string(kv.Value), strings.Split(second, ".")[3]) {
			t.Fatalf("%s holds a token's secret in clear", kv.Key)
		}
	}
}

// A host that publishes what it was not enrolled with (another address,
// another identity) is cut off by the server's guard; records that match
// its enrollment are left alone.
func TestGuardCutsOffAHostThatClaimsTooMuch(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(t *testing.T, vm *kvstore.Client, e *enroll.Enrollment, own, other uint32)
	}{
		{"another address in the node record", func(t *testing.T, vm *kvstore.Client, e *enroll.Enrollment, own, other uint32) {
			putNode(t, vm, e, netip.MustParsePrefix("10.1.200.99/32"), netip.MustParsePrefix("fd00:1:0:c8::2/128"))
		}},
		{"an ipcache entry under another identity", func(t *testing.T, vm *kvstore.Client, e *enroll.Enrollment, own, other uint32) {
			putIP(t, vm, e, e.Addresses[0], other)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := setup(t)
			ctx := ctxT(t)
			f.apply(t, "db1", "")
			e, key, err := f.join(t, f.token(t, "db1", time.Minute), f.fp)
			if err != nil {
				t.Fatal(err)
			}
			own, other := uint32(1<<20|500), uint32(1<<20|501)
			for id, l := range map[uint32]map[string]string{
				own:   {"app": "db", "isthmus.io/namespace": "default", "isthmus.io/cluster": "c1"},
				other: {"app": "payments", "isthmus.io/namespace": "default", "isthmus.io/cluster": "c1"},
			} {
				v, _ := records.IdentityRecord{ID: id, Labels: l}.Marshal()
				if err := f.c.KV().Put(ctx, records.IdentityIDKey(id), v); err != nil {
					t.Fatal(err)
				}
			}
			vm := f.client(t, e, key)
			// What the agent publishes: accepted.
			putNode(t, vm, e, netip.PrefixFrom(e.Addresses[0], 32), netip.PrefixFrom(e.Addresses[1], 128))
			putIP(t, vm, e, e.Addresses[0], own)
			time.Sleep(500 * time.Millisecond)
			if w, _, _ := enroll.Get(ctx, f.c.KV(), "db1"); !w.Status.Enrolled {
				t.Fatalf("records that match the enrollment got the host cut off: %+v", w.Status)
			}
			tc.write(t, vm, e, own, other)
			servertest.Eventually(t, 2*time.Second, "the host cut off", func() error {
				w, _, err := enroll.Get(ctx, f.c.KV(), "db1")
				if err != nil || w.Status.Enrolled || !w.Status.Revoked {
					return fmt.Errorf("status %+v, %v", w.Status, err)
				}
				if _, found, _ := f.c.KV().Get(ctx, records.NodeKey("c1", e.Node)); found {
					return errors.New("its node record is still there")
				}
				return nil
			})
		})
	}
}

func putNode(t *testing.T, vm *kvstore.Client, e *enroll.Enrollment, cidrs ...netip.Prefix) {
	t.Helper()
	v, err := records.Node{Name: e.Node, Cluster: "c1", ClusterID: 1, IPs: []netip.Addr{netip.MustParseAddr("203.0.113.9")},
		PodCIDRs: cidrs}.Marshal()
	if err == nil {
		err = vm.Put(context.Background(), records.NodeKey("c1", e.Node), v)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func putIP(t *testing.T, vm *kvstore.Client, e *enroll.Enrollment, a netip.Addr, id uint32) {
	t.Helper()
	p := netip.PrefixFrom(a, a.BitLen())
	v, err := records.IPCacheEntry{Prefix: p, Identity: id, HostIP: netip.MustParseAddr("203.0.113.9"), Cluster: "c1"}.Marshal()
	if err == nil {
		err = vm.Put(context.Background(), records.IPCacheKey("c1", e.Node, p), v)
	}
	if err != nil {
		t.Fatal(err)
	}
}
