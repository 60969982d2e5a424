package labtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/isthmus-mesh/isthmus/lab"
)

// Tests and the programs under tests/ (bench, demo) run the binaries of the
// source tree they are built from: Binaries builds them once per process
// into a temp dir (go build from the module root), unless $ISTHMUS_BIN_DIR
// names a directory that has them. Call Cleanup when done (TestMain, or a
// defer in main).

var (
	buildOnce sync.Once
	buildDir  string
	built     lab.Binaries
	buildErr  error
)

// Binaries returns the project's binaries: those in $ISTHMUS_BIN_DIR, or
// built once per process from the module source.
func Binaries() (lab.Binaries, error) {
	buildOnce.Do(func() {
		if dir := os.Getenv(lab.EnvBinDir); dir != "" {
			built, buildErr = lab.BinariesIn(dir)
			built.From = "$" + lab.EnvBinDir
			return
		}
		buildDir, buildErr = build()
		if buildErr == nil {
			built, buildErr = lab.BinariesIn(buildDir)
			built.From = "built from the source tree into " + buildDir
		}
	})
	return built, buildErr
}

// Cleanup removes the binaries Binaries built.
func Cleanup() {
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

func build() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "isthmus-bin-")
	if err != nil {
		return "", err
	}
	cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/"+lab.AgentBinary, "./cmd/"+lab.CLIBinary, "./cmd/"+lab.ServerBinary, "./cmd/"+lab.CNIBinary)
	cmd.Dir = root
	// Static, as `make lab` builds them: the Kubernetes lab (lab/kube.Up)
	// packages them into images that hold no C library.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("labtest: build binaries: %v\n%s", err, out)
	}
	return dir, nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/isthmus-mesh/isthmus\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("labtest: cannot find the isthmus module root to build binaries (set " + lab.EnvBinDir + ")")
		}
		dir = parent
	}
}

// StaticCLI returns the isthmus CLI of Binaries, which are static: the
// binary of the images the Kubernetes lab's pods run (lab/kube.WriteImages),
// which have no libc.
func StaticCLI(tb testing.TB) string {
	tb.Helper()
	b, err := Binaries()
	if err != nil {
		tb.Fatal(err)
	}
	return b.CLI
}
