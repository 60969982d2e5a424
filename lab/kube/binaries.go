package kube

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Version is the Kubernetes release the lab runs (`make kube-binaries`
// builds it into bin/kubernetes/<Version>).
const Version = "v1.36.3"

// EnvBinDir names a directory holding the Kubernetes binaries; it takes
// precedence over the lookup of FindBinaries.
const EnvBinDir = "ISTHMUS_KUBE_BIN_DIR"

// Binaries are the paths of the Kubernetes binaries a cluster runs.
type Binaries struct {
	APIServer, ControllerManager, Scheduler, Kubelet, Kubectl string
	// Dir holds them all; From says how it was found, for the user.
	Dir, From string
}

var binaryNames = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"}

const buildHint = "run 'make kube-binaries' (it builds Kubernetes " + Version + " into bin/kubernetes/" + Version + ") or set " + EnvBinDir

// BinariesIn returns the binaries in dir; all must be there.
func BinariesIn(dir string) (Binaries, error) {
	var missing []string
	for _, n := range binaryNames {
		if !isExecutable(filepath.Join(dir, n)) {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return Binaries{}, fmt.Errorf("kube: %s has no %s: %s", dir, strings.Join(missing, ", "), buildHint)
	}
	return Binaries{
		APIServer:         filepath.Join(dir, "kube-apiserver"),
		ControllerManager: filepath.Join(dir, "kube-controller-manager"),
		Scheduler:         filepath.Join(dir, "kube-scheduler"),
		Kubelet:           filepath.Join(dir, "kubelet"),
		Kubectl:           filepath.Join(dir, "kubectl"),
		Dir:               dir,
		From:              dir,
	}, nil
}

// FindBinaries finds the Kubernetes binaries, never building them: in
// $ISTHMUS_KUBE_BIN_DIR when set; else in kubernetes/<Version> next to the
// running executable (bin/kubernetes/v1.36.3 for bin/isthmus); else in
// bin/kubernetes/<Version> of the first directory at or above the working
// directory that has a go.mod (the source tree). Missing binaries are an
// error that names `make kube-binaries`.
func FindBinaries() (Binaries, error) {
	if dir := os.Getenv(EnvBinDir); dir != "" {
		b, err := BinariesIn(dir)
		if err != nil {
			return Binaries{}, fmt.Errorf("%s=%s: %w", EnvBinDir, dir, err)
		}
		b.From = "$" + EnvBinDir
		return b, nil
	}
	var tried []string
	if exe := executable(); exe != "" {
		dir := filepath.Join(filepath.Dir(exe), "kubernetes", Version)
		if _, err := os.Stat(dir); err == nil {
			b, err := BinariesIn(dir)
			if err == nil {
				b.From = "next to " + exe
			}
			return b, err
		}
		tried = append(tried, dir)
	}
	if d := sourceTree(); d != "" {
		b, err := BinariesIn(filepath.Join(d, "bin", "kubernetes", Version))
		if err == nil {
			b.From = "the source tree " + d
		}
		return b, err
	}
	return Binaries{}, errors.New("kube: Kubernetes " + Version + " binaries not found (looked in $" + EnvBinDir + ", " +
		strings.Join(append(tried, "bin/kubernetes/"+Version+" of the source tree"), ", ") + "): " + buildHint)
}
