// Package ociimage writes container images as tarballs without a registry
// or docker, with go-containerregistry: one layer of files from the host,
// an entrypoint, labels. The tarball is in the docker-save format with the
// images' refs as repo tags, which `ctr -n k8s.io images import` imports
// under those names (and `crane push` / `skopeo copy docker-archive:` can
// push to a registry unchanged). The manifests and configs are OCI-standard
// (go-containerregistry's), the layers gzip-compressed.
//
// Used by `make images` (scripts/images: the agent and clustermesh images
// of the Helm chart) and lab/kube (the lab's pause and tools images).
package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Standard OCI annotation keys, set as image config labels.
const (
	LabelTitle    = "org.opencontainers.image.title"
	LabelSource   = "org.opencontainers.image.source"
	LabelVersion  = "org.opencontainers.image.version"
	LabelRevision = "org.opencontainers.image.revision"
)

// DefaultPath is the PATH of an image whose Env does not set one.
const DefaultPath = "PATH=/usr/local/bin:/usr/bin:/bin:/"

// Image describes one linux/amd64 image with a single layer.
type Image struct {
	// Ref names the image, e.g. localhost/isthmus/agent:v0.1.0; it becomes
	// its repo tag in the tarball.
	Ref string
	// Files of the layer: path in the image -> file on the host (its
	// content and permission bits are copied; owner root, time zero). The
	// parent directories and /tmp (mode 1777) are added.
	Files map[string]string
	// Entrypoint and Cmd of the config.
	Entrypoint []string
	Cmd        []string
	// Env of the config; DefaultPath when it has no PATH.
	Env []string
	// Labels of the config, e.g. LabelTitle.
	Labels map[string]string
}

// Write writes images into one tarball out (its directory is created);
// layers with the same files are stored once.
func Write(out string, images ...Image) error {
	if len(images) == 0 {
		return fmt.Errorf("ociimage: no images to write to %s", out)
	}
	refs := map[name.Reference]v1.Image{}
	layers := map[string]v1.Layer{}
	for _, im := range images {
		ref, err := name.ParseReference(im.Ref, name.StrictValidation)
		if err != nil {
			return fmt.Errorf("ociimage: image ref %q: %w", im.Ref, err)
		}
		key := layerKey(im.Files)
		layer, ok := layers[key]
		if !ok {
			data, err := layerTar(im.Files)
			if err != nil {
				return fmt.Errorf("ociimage: image %s: %w", im.Ref, err)
			}
			layer, err = tarball.LayerFromOpener(func() (io.ReadCloser, error) {
				return io.NopCloser(bytes.NewReader(data)), nil
			}, tarball.WithCompressionLevel(gzip.BestSpeed))
			if err != nil {
				return fmt.Errorf("ociimage: image %s: %w", im.Ref, err)
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
		cf.Config.Entrypoint = slices.Clone(im.Entrypoint)
		cf.Config.Cmd = slices.Clone(im.Cmd)
		cf.Config.Env = slices.Clone(im.Env)
		if !slices.ContainsFunc(cf.Config.Env, func(e string) bool { return strings.HasPrefix(e, "PATH=") }) {
			cf.Config.Env = append(cf.Config.Env, DefaultPath)
		}
		cf.Config.WorkingDir = "/"
		if len(im.Labels) > 0 {
			cf.Config.Labels = maps.Clone(im.Labels)
		}
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			return err
		}
		refs[ref] = img
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	// Written next to out and renamed: an interrupted run leaves no
	// half-written tarball under the name.
	tmp := out + ".tmp"
	if err := tarball.MultiRefWriteToFile(tmp, refs); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("ociimage: write %s: %w", out, err)
	}
	return os.Rename(tmp, out)
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
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("%s (for %s) is not a regular file", src, p)
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
