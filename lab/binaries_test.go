package lab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fakeBinaries(t *testing.T, dir string, names ...string) {
	t.Helper()
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func TestFindBinaries(t *testing.T) {
	dir := t.TempDir()
	fakeBinaries(t, dir, AgentBinary, ServerBinary, CLIBinary)

	// $ISTHMUS_BIN_DIR wins.
	t.Setenv(EnvBinDir, dir)
	b, err := FindBinaries()
	if err != nil {
		t.Fatal(err)
	}
	if b.Agent != filepath.Join(dir, AgentBinary) || b.Server != filepath.Join(dir, ServerBinary) || b.CLI != filepath.Join(dir, CLIBinary) || b.From != "$"+EnvBinDir {
		t.Fatalf("from %s: %+v", EnvBinDir, b)
	}
	if p, err := b.Path(AgentBinary); err != nil || p != b.Agent {
		t.Errorf("Path(agent) = %q, %v", p, err)
	}
	if _, err := b.Path(CNIBinary); err == nil || b.CNI != "" {
		t.Errorf("Path(cni) without the plugin = %q, %v", b.CNI, err)
	}
	fakeBinaries(t, dir, CNIBinary)
	if b, err := FindBinaries(); err != nil || b.CNI != filepath.Join(dir, CNIBinary) {
		t.Errorf("with the plugin: %+v, %v", b, err)
	}
	if _, err := b.Path("gcc"); err == nil {
		t.Error("Path accepted a foreign name")
	}

	// Then $PATH (the test binary has no siblings).
	t.Setenv(EnvBinDir, "")
	t.Setenv("PATH", dir)
	if b, err := FindBinaries(); err != nil || b.From != "$PATH" || b.Agent != filepath.Join(dir, AgentBinary) {
		t.Fatalf("from $PATH: %+v, %v", b, err)
	}

	// A missing binary is an error that says how to get it.
	empty := t.TempDir()
	fakeBinaries(t, empty, CLIBinary, ServerBinary)
	t.Setenv("PATH", empty)
	_, err = FindBinaries()
	if err == nil || !strings.Contains(err.Error(), AgentBinary) || !strings.Contains(err.Error(), "make build") || strings.Contains(err.Error(), ServerBinary+",") {
		t.Fatalf("missing agent in $PATH: %v", err)
	}
	t.Setenv(EnvBinDir, empty)
	if _, err := FindBinaries(); err == nil || !strings.Contains(err.Error(), empty+" has no "+AgentBinary) || !strings.Contains(err.Error(), "make build") {
		t.Fatalf("missing agent in %s: %v", EnvBinDir, err)
	}
}

// A lab asks for its binaries only when it first starts one, once.
func TestLabBinariesOnce(t *testing.T) {
	calls := 0
	l := &Lab{findBinaries: func() (Binaries, error) {
		calls++
		return Binaries{Agent: "/a", Server: "/s", CLI: "/c", From: "test"}, nil
	}}
	for range 3 {
		if p, err := l.Binary(ServerBinary); err != nil || p != "/s" {
			t.Fatalf("Binary(server) = %q, %v", p, err)
		}
	}
	if calls != 1 {
		t.Fatalf("binaries looked up %d times", calls)
	}
}
