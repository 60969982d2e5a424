package kube

import "github.com/isthmus-mesh/isthmus/internal/ociimage"

// Images of the lab, built from a static isthmus binary (WriteImages).
const (
	// PauseImage is every pod's sandbox: `isthmus connectivity pause`.
	PauseImage = "localhost/isthmus/pause:v1"
	// ToolsImage runs isthmus (entrypoint /isthmus), e.g. with the args
	// `lab echo-server ...` or `connectivity kube-api`.
	ToolsImage = "localhost/isthmus/tools:v1"
)

// Image describes one image: its ref, the files of its single layer (path
// in the image -> file on the host) and its entrypoint (ociimage.Image).
type Image = ociimage.Image

// BuildImage writes a one-layer linux/amd64 image as a docker-save tarball
// (what `ctr -n k8s.io images import` imports; the image gets the name
// ref). No registry or docker is involved.
func BuildImage(ref string, files map[string]string, entrypoint []string, out string) error {
	return BuildImages(out, Image{Ref: ref, Files: files, Entrypoint: entrypoint})
}

// BuildImages writes several images into one tarball; layers with the same
// content are stored once (ociimage.Write).
func BuildImages(out string, images ...Image) error {
	return ociimage.Write(out, images...)
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
