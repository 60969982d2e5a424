package vmjoin

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/clustermesh/enroll"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

// The host side against a real server: the credential is stored with mode
// 0600 and found again by Load, a refused enrollment stores nothing, and
// the renewal loop replaces the certificate before it expires, with a
// certificate the cluster's etcd accepts.
func TestJoinStoresAndRenews(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := servertest.New(t, "c1", 1, "10.1.0.0/16")
	c.Config.Enroll = server.EnrollConfig{Listen: "127.0.0.1:0", VMCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.200.0/24")},
		CertValidity: 6 * time.Second}
	c.Start(t)
	fp, _ := c.API().Server.CAFingerprint()
	url := "https://" + c.API().EnrollAddr()
	w, err := objects.DecodeExternalWorkload([]byte("apiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\nmetadata: {name: db1, labels: {app: db}}"))
	if err != nil {
		t.Fatal(err)
	}
	if err := enroll.Apply(ctx, c.KV(), w); err != nil {
		t.Fatal(err)
	}
	tok, _, err := enroll.CreateToken(ctx, c.KV(), "c1", "db1", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if _, err := Join(ctx, dir, url, tok, "00"+fp[2:], nil); err == nil {
		t.Fatal("joined with a wrong CA fingerprint")
	}
	if _, found, err := Load(dir); found || err != nil {
		t.Fatalf("a refused enrollment stored something: %v, %v", found, err)
	}
	st, err := Join(ctx, dir, url, tok, fp, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{meshsync.BundleKey, meshsync.BundleCert} {
		fi, err := os.Stat(filepath.Join(st.BundleDir(), f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v; want 0600", f, err, fi.Mode().Perm())
		}
	}
	again, found, err := Load(dir)
	if err != nil || !found || again.Enrollment.Node != "vm-db1" || len(again.Enrollment.Addresses) != 1 {
		t.Fatalf("Load after Join: %+v, %v, %v", again, found, err)
	}
	first, _, err := again.CertExpiry()
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); again.RenewLoop(rctx, slog.New(slog.DiscardHandler)) }()
	defer func() { rcancel(); <-done }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, _, err := again.CertExpiry()
		if err == nil && n.After(first) {
			if left := time.Until(first); left < 0 || left > 3*time.Second {
				t.Errorf("renewed %s before the old certificate's expiry, want at two thirds of its 6 s (about 2 s before)", left)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the certificate (expiring %s) was not renewed", first)
		}
		time.Sleep(100 * time.Millisecond)
	}
	tc, err := meshsync.LoadBundle(again.BundleDir(), "c1")
	if err != nil {
		t.Fatal(err)
	}
	if user, err := meshsync.BundleUser(tc); err != nil || user != "node-vm-db1.1" {
		t.Errorf("renewed bundle user %q, %v", user, err)
	}
}
