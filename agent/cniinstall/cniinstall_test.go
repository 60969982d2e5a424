package cniinstall

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestInstall(t *testing.T) {
	dir := t.TempDir()
	plugin := filepath.Join(dir, "src", "isthmus-cni")
	if err := os.MkdirAll(filepath.Dir(plugin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plugin, []byte("#!/bin/sh\necho v1\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	c := Config{BinDir: filepath.Join(dir, "opt/cni/bin"), ConfDir: filepath.Join(dir, "etc/cni/net.d"),
		PluginPath: plugin, Socket: "/var/run/isthmus/n1.sock", MTU: 1450}
	for round := range 2 { // a second start replaces both files
		wrote, err := Install(c)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{filepath.Join(c.BinDir, "isthmus-cni"), filepath.Join(c.ConfDir, "05-isthmus.conflist")}
		if !reflect.DeepEqual(wrote, want) {
			t.Fatalf("round %d: wrote %v, want %v", round, wrote, want)
		}
	}
	st, err := os.Stat(filepath.Join(c.BinDir, "isthmus-cni"))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("plugin binary: %v, %v; want mode 0755", st.Mode(), err)
	}
	if b, _ := os.ReadFile(filepath.Join(c.BinDir, "isthmus-cni")); string(b) != "#!/bin/sh\necho v1\n" {
		t.Errorf("plugin binary content %q", b)
	}
	data, err := os.ReadFile(filepath.Join(c.ConfDir, ConfListName))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"cniVersion": "1.0.0", "name": "isthmus", "plugins": []any{
		map[string]any{"type": "isthmus-cni", "agentSocket": "/var/run/isthmus/n1.sock", "mtu": 1450.0},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("conflist:\n got %v\nwant %v", got, want)
	}
	if left, _ := filepath.Glob(filepath.Join(c.ConfDir, ".*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestInstallOnlyWhatIsConfigured(t *testing.T) {
	dir := t.TempDir()
	c := Config{ConfDir: dir, Socket: "/s.sock", CNIVersion: "1.1.0"}
	wrote, err := Install(c)
	if err != nil || len(wrote) != 1 {
		t.Fatalf("Install = %v, %v", wrote, err)
	}
	data, _ := os.ReadFile(wrote[0])
	var cl ConfList
	if err := json.Unmarshal(data, &cl); err != nil || cl.CNIVersion != "1.1.0" || cl.Plugins[0].MTU != 0 {
		t.Errorf("conflist %s: %+v, %v", data, cl, err)
	}
	if _, err := Install(Config{BinDir: dir, Socket: "/s.sock"}); err == nil {
		t.Error("a bin dir without a plugin path: no error")
	}
	if _, err := Install(Config{BinDir: dir, PluginPath: filepath.Join(dir, "missing"), Socket: "/s.sock"}); err == nil {
		t.Error("a missing plugin binary: no error")
	}
	if _, err := Install(Config{ConfDir: dir}); err == nil {
		t.Error("no socket: no error")
	}
	if _, err := Install(Config{ConfDir: dir, Socket: "/s.sock", CNIVersion: "0.3.1"}); err == nil {
		t.Error("cniVersion 0.3.1: no error")
	}
	if (Config{}).Enabled() {
		t.Error("the zero Config is enabled")
	}
}
