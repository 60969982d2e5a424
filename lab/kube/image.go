package kube

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Images of the lab, built from a static isthmus binary (WriteImages).
const (
	// PauseImage is every pod's sandbox: `isthmus connectivity pause`.
	PauseImage = "localhost/isthmus/pause:v1"
	// ToolsImage runs isthmus (entrypoint /isthmus), e.g. with the args
	// `lab echo-server ...` or `connectivity kube-api`.
	ToolsImage = "localhost/isthmus/tools:v1"
)

// Image describes one image: its ref, the files of its single layer (path
// in the image -> file on the host) and its entrypoint.
type Image struct {
	Ref        string
	Files      map[string]string
	Entrypoint []string
}

// BuildImage writes a one-layer linux/amd64 image as a docker-save tarball
// (what `ctr -n k8s.io images import` imports; the image gets the name
// ref). No registry or docker is involved.
func BuildImage(ref string, files map[string]string, entrypoint []string, out string) error {
	return BuildImages(out, Image{Ref: ref, Files: files, Entrypoint: entrypoint})
}

// BuildImages writes several images into one tarball; layers with the same
// content are stored once.
func BuildImages(out string, images ...Image) error {
	refs := map[name.Reference]v1.Image{}
	layers := map[string]v1.Layer{}
	for _, im := range images {
		ref, err := name.ParseReference(im.Ref, name.StrictValidation)
		if err != nil {
			return fmt.Errorf("kube: image ref %q: %w", im.Ref, err)
		}
		key := layerKey(im.Files)
		layer, ok := layers[key]
		if !ok {
			data, err := layerTar(im.Files)
			if err != nil {
				return fmt.Errorf("kube: image %s: %w", im.Ref, err)
			}
			layer, err = tarball.LayerFromOpener(func() (io.ReadCloser, error) {
				return io.NopCloser(bytes.NewReader(data)), nil
			}, tarball.WithCompressionLevel(gzip.BestSpeed))
			if err != nil {
				return fmt.Errorf("kube: image %s: %w", im.Ref, err)
			}
			layers[key] = layer
		}
		img, err := mutate.AppendLayers(empty.Image, layer)
		if err != nil {
			return err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return err
		}
		cf = cf.DeepCopy()
		cf.Architecture, cf.OS = "amd64", "linux"
		cf.Config.Entrypoint = im.Entrypoint
		cf.Config.Env = []string{"PATH=/"}
		cf.Config.WorkingDir = "/"
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			return err
		}
		refs[ref] = img
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := tarball.MultiRefWriteToFile(out, refs); err != nil {
		return fmt.Errorf("kube: write %s: %w", out, err)
	}
	return nil
}

func layerKey(files map[string]string) string {
	keys := make([]string, 0, len(files))
	for k, v := range files {
		keys = append(keys, k+"\x00"+v)
	}
	sort.Strings(keys)
	return strings.Join(keys, "\x01")
}

// layerTar returns an uncompressed tar of the files (and their parent dirs,
// plus /tmp) with fixed owners and times.
func layerTar(files map[string]string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{"tmp": true}
	var paths []string
	for p := range files {
		clean := strings.TrimPrefix(path.Clean("/"+p), "/")
		if clean == "" {
			return nil, fmt.Errorf("bad path %q in image", p)
		}
		paths = append(paths, p)
		for d := path.Dir(clean); d != "." && d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	dl := make([]string, 0, len(dirs))
	for d := range dirs {
		dl = append(dl, d)
	}
	sort.Strings(dl)
	for _, d := range dl {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode}); err != nil {
			return nil, err
		}
	}
	sort.Strings(paths)
	for _, p := range paths {
		src := files[p]
		st, err := os.Stat(src)
		if err != nil {
			return nil, err
		}
		b, err := os.ReadFile(src)
		if err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(path.Clean("/"+p), "/"), Mode: int64(st.Mode().Perm()), Size: int64(len(b))}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteImages writes PauseImage and ToolsImage, both holding the static
// isthmus binary isthmusBin as /isthmus, into one tarball out (for
// NodeOptions.Images; pass PauseImage as NodeOptions.SandboxImage, the
// default). isthmusBin must be static: CGO_ENABLED=0 go build ./cmd/isthmus.
func WriteImages(isthmusBin, out string) error {
	files := map[string]string{"/isthmus": isthmusBin}
	return BuildImages(out,
		Image{Ref: PauseImage, Files: files, Entrypoint: []string{"/isthmus", "connectivity", "pause"}},
		Image{Ref: ToolsImage, Files: files, Entrypoint: []string{"/isthmus"}},
	)
}
