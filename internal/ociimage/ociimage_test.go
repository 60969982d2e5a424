package ociimage

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

// readImage reads ref from the tarball file: its entrypoint, labels and the
// files (content, mode) of its layers.
func readImage(t *testing.T, file, ref string) (entrypoint []string, labels map[string]string, files map[string][]byte, modes map[string]int64) {
	t.Helper()
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(file, &tag)
	if err != nil {
		t.Fatalf("read %s from %s: %v", ref, file, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "amd64" {
		t.Errorf("platform %s/%s, want linux/amd64", cf.OS, cf.Architecture)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	files, modes = map[string][]byte{}, map[string]int64{}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(tr)
			files[h.Name], modes[h.Name] = b, h.Mode
		}
		rc.Close()
	}
	return cf.Config.Entrypoint, cf.Config.Labels, files, modes
}

func TestWriteReadBack(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "tool")
	if err := os.WriteFile(bin, []byte("#!/bin/true\nhello"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "images", "x.tar")
	labels := map[string]string{LabelTitle: "tool", LabelVersion: "v1.2.3"}
	err := Write(out, Image{Ref: "localhost/test/tool:v1.2.3", Files: map[string]string{"/usr/local/bin/tool": bin},
		Entrypoint: []string{"/usr/local/bin/tool", "serve"}, Labels: labels})
	if err != nil {
		t.Fatal(err)
	}
	ep, got, files, modes := readImage(t, out, "localhost/test/tool:v1.2.3")
	if !slices.Equal(ep, []string{"/usr/local/bin/tool", "serve"}) {
		t.Errorf("entrypoint %q", ep)
	}
	for k, v := range labels {
		if got[k] != v {
			t.Errorf("label %s = %q, want %q", k, got[k], v)
		}
	}
	if string(files["usr/local/bin/tool"]) != "#!/bin/true\nhello" || modes["usr/local/bin/tool"] != 0o755 {
		t.Errorf("usr/local/bin/tool: %q mode %o", files["usr/local/bin/tool"], modes["usr/local/bin/tool"])
	}
	if _, ok := files["tmp/"]; !ok || modes["tmp/"] != 0o1777 {
		t.Errorf("no /tmp with mode 1777 in the layer: %v", modes)
	}
	if _, err := os.Stat(out + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temp file left: %v", err)
	}
	// The ref is the tarball's repo tag (what ctr import names the image).
	if _, err := tarball.ImageFromPath(out, nil); err != nil {
		t.Errorf("single image without a tag: %v", err)
	}
	if err := Write(filepath.Join(dir, "bad.tar"), Image{Ref: "Not A Ref", Files: map[string]string{"/t": bin}}); err == nil {
		t.Error("a bad ref was accepted")
	}
	if err := Write(filepath.Join(dir, "missing.tar"), Image{Ref: "localhost/t:v1", Files: map[string]string{"/t": filepath.Join(dir, "nope")}}); err == nil {
		t.Error("a missing file was accepted")
	}
}

// fakeBins writes stand-ins for the four binaries.
func fakeBins(t *testing.T) string {
	dir := t.TempDir()
	for _, n := range []string{"isthmus-agent", "isthmus-cni", "isthmus-clustermesh", "isthmus"} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("binary "+n), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestWriteIsthmus(t *testing.T) {
	b := Build{BinDir: fakeBins(t), Tag: "0.1.0-test", Revision: "abc123"}
	paths, err := WriteIsthmus(b, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ep, labels, files, _ := readImage(t, paths[0], "localhost/isthmus/agent:0.1.0-test")
	if !slices.Equal(ep, []string{"/usr/local/bin/isthmus-agent"}) {
		t.Errorf("agent entrypoint %q", ep)
	}
	for _, n := range []string{"isthmus-agent", "isthmus-cni", "isthmus"} {
		if string(files["usr/local/bin/"+n]) != "binary "+n {
			t.Errorf("agent image: /usr/local/bin/%s = %q", n, files["usr/local/bin/"+n])
		}
	}
	want := map[string]string{LabelTitle: "isthmus-agent", LabelSource: Source, LabelVersion: "0.1.0-test", LabelRevision: "abc123"}
	for k, v := range want {
		if labels[k] != v {
			t.Errorf("agent label %s = %q, want %q", k, labels[k], v)
		}
	}
	ep, labels, files, _ = readImage(t, paths[1], "localhost/isthmus/clustermesh:0.1.0-test")
	if !slices.Equal(ep, []string{"/usr/local/bin/isthmus-clustermesh"}) || labels[LabelTitle] != "isthmus-clustermesh" {
		t.Errorf("clustermesh entrypoint %q labels %v", ep, labels)
	}
	if string(files["usr/local/bin/isthmus"]) != "binary isthmus" {
		t.Errorf("clustermesh image lacks the isthmus CLI: %v", files)
	}
	if _, ok := files["usr/local/bin/isthmus-agent"]; ok {
		t.Error("clustermesh image carries the agent")
	}
	if _, err := WriteIsthmus(Build{BinDir: b.BinDir}, t.TempDir()); err == nil {
		t.Error("no tag was accepted")
	}
}

// TestImportContainerd imports the tarballs into a throwaway containerd
// (its own root, state and socket) and checks ctr names them by their refs.
func TestImportContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	testenv.Root(t, "runs a containerd")
	containerd := testenv.Tool(t, "containerd", "containerd")
	ctr := testenv.Tool(t, "ctr", "containerd")
	b := Build{BinDir: fakeBins(t), Tag: "0.1.0-test", Revision: "abc123"}
	paths, err := WriteIsthmus(b, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	// Short paths: a unix socket path has at most 107 bytes.
	base, err := os.MkdirTemp("", "ctrd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	sock := filepath.Join(base, "c.sock")
	cfg := filepath.Join(base, "config.toml")
	// Only the content and metadata plugins matter; CRI and the snapshotters
	// that need kernel features stay off.
	if err := os.WriteFile(cfg, []byte("version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var logs bytes.Buffer
	cmd := exec.CommandContext(ctx, containerd, "--config", cfg, "--root", filepath.Join(base, "root"), "--state", filepath.Join(base, "state"), "--address", sock)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if exec.Command(ctr, "--address", sock, "version").Run() == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not come up:\n%s", logs.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range paths {
		// --no-unpack: unpacking needs a snapshotter; the import itself is
		// what proves the tarball and its names.
		if out, err := exec.Command(ctr, "--address", sock, "-n", "k8s.io", "images", "import", "--no-unpack", p).CombinedOutput(); err != nil {
			t.Fatalf("ctr import %s: %v\n%s", p, err, out)
		}
	}
	out, err := exec.Command(ctr, "--address", sock, "-n", "k8s.io", "images", "ls", "-q").CombinedOutput()
	if err != nil {
		t.Fatalf("ctr images ls: %v\n%s", err, out)
	}
	for _, ref := range []string{b.AgentRef(), b.ClustermeshRef()} {
		if !slices.Contains(strings.Fields(string(out)), ref) {
			t.Errorf("ctr does not list %s after the import:\n%s", ref, out)
		}
	}
}
