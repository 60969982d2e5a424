package etcdserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A server seeded from a CA kept outside its data dir (Config.CADir)
// accepts a shared agents credential issued from that CA before it ever
// ran, and still does after its data dir is lost.
func TestCADirSeedsThePKI(t *testing.T) {
	ca, err := NewCA("c1")
	if err != nil {
		t.Fatal(err)
	}
	caDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(caDir, CACertFile), ca.Cert, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(caDir, CAKeyFile), ca.Key, 0o600); err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.IssueClient("c1", UserAgents)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.ClientUsable("c1", UserAgents, cert, key) {
		t.Fatal("a fresh agents certificate is not usable")
	}
	if ca.ClientUsable("c1", UserRoot, cert, key) || ca.ClientUsable("c2", UserAgents, cert, key) {
		t.Fatal("the agents certificate passes for root or for another cluster")
	}
	other, _ := NewCA("c1")
	if other.ClientUsable("c1", UserAgents, cert, key) {
		t.Fatal("a certificate of another CA is usable")
	}
	if _, _, err := ca.IssueClient("c2", UserAgents); err == nil {
		t.Fatal("the CA of c1 issued for c2")
	}

	for round := range 2 {
		cfg := sharedConfig(t) // a new, empty data dir each round
		cfg.CADir = caDir
		s := start(t, cfg)
		b := Bundle{Cluster: "c1", ClusterID: 1, Endpoints: s.Endpoints(), User: UserAgents, CACert: ca.Cert, Cert: cert, Key: key}
		c := connectBundle(t, b)
		if err := c.Put(testCtx(t), "isthmus/state/nodes/v1/c1/n1", []byte("x")); err != nil {
			t.Fatalf("round %d: the pre-issued agents credential cannot write: %v", round, err)
		}
		s.Close()

		// The data dir now has a CA: another one in the CA dir is refused.
		otherDir := t.TempDir()
		os.WriteFile(filepath.Join(otherDir, CACertFile), other.Cert, 0o644)
		os.WriteFile(filepath.Join(otherDir, CAKeyFile), other.Key, 0o600)
		cfg.CADir = otherDir
		if _, err := Start(testCtx(t), cfg); err == nil || !strings.Contains(err.Error(), "is not the one in the CA dir") {
			t.Fatalf("a data dir with another CA: %v", err)
		}
	}

	cfg := testConfig(t)
	cfg.ClusterName = "c2"
	cfg.CADir = caDir
	if _, err := Start(testCtx(t), cfg); err == nil || !strings.Contains(err.Error(), "not the CA of cluster") {
		t.Fatalf("the CA of c1 for a server of c2: %v", err)
	}
}
