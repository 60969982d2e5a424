package ociimage

import (
	"fmt"
	"path/filepath"
)

// The images of an Isthmus installation (the Helm chart deploy/helm/isthmus
// runs them), built from static binaries by `make images`.
const (
	// DefaultRepository prefixes the images' names: <repository>/agent and
	// <repository>/clustermesh. "localhost/..." never resolves to a
	// registry, so a node uses the imported image (pull policy IfNotPresent).
	DefaultRepository = "localhost/isthmus"
	// Source is the org.opencontainers.image.source label.
	Source = "https://github.com/isthmus-mesh/isthmus"

	// AgentTarball and ClustermeshTarball are the files WriteIsthmus writes.
	AgentTarball       = "isthmus-agent.tar"
	ClustermeshTarball = "isthmus-clustermesh.tar"

	// BinDir is where the images keep the binaries (on PATH).
	BinDir = "/usr/local/bin"
)

// Build says what the Isthmus images are built from and named.
type Build struct {
	// BinDir holds the static (CGO_ENABLED=0) binaries isthmus-agent,
	// isthmus-cni, isthmus-clustermesh and isthmus.
	BinDir string
	// Repository is DefaultRepository when empty.
	Repository string
	// Tag of both images (the chart's image.tag), also the version label.
	Tag string
	// Revision is the source commit (label), optional.
	Revision string
}

func (b Build) repo() string {
	if b.Repository == "" {
		return DefaultRepository
	}
	return b.Repository
}

// AgentRef and ClustermeshRef are the images' names.
func (b Build) AgentRef() string       { return b.repo() + "/agent:" + b.Tag }
func (b Build) ClustermeshRef() string { return b.repo() + "/clustermesh:" + b.Tag }

func (b Build) labels(title string) map[string]string {
	l := map[string]string{LabelTitle: title, LabelSource: Source, LabelVersion: b.Tag}
	if b.Revision != "" {
		l[LabelRevision] = b.Revision
	}
	return l
}

func (b Build) bin(name string) (string, string) {
	return BinDir + "/" + name, filepath.Join(b.BinDir, name)
}

// AgentImage is the node agent: entrypoint isthmus-agent, with the CNI
// plugin isthmus-cni next to it (the agent's --cni-bin-dir installs that
// copy) and the isthmus CLI (kubectl exec ... isthmus status).
func (b Build) AgentImage() Image {
	files := map[string]string{}
	for _, n := range []string{"isthmus-agent", "isthmus-cni", "isthmus"} {
		in, host := b.bin(n)
		files[in] = host
	}
	return Image{Ref: b.AgentRef(), Files: files, Entrypoint: []string{BinDir + "/isthmus-agent"}, Labels: b.labels("isthmus-agent")}
}

// ClustermeshImage is the cluster's clustermesh server: entrypoint
// isthmus-clustermesh, with the isthmus CLI (the chart's PKI job runs
// `isthmus clustermesh certs`).
func (b Build) ClustermeshImage() Image {
	files := map[string]string{}
	for _, n := range []string{"isthmus-clustermesh", "isthmus"} {
		in, host := b.bin(n)
		files[in] = host
	}
	return Image{Ref: b.ClustermeshRef(), Files: files, Entrypoint: []string{BinDir + "/isthmus-clustermesh"}, Labels: b.labels("isthmus-clustermesh")}
}

// WriteIsthmus writes AgentTarball and ClustermeshTarball into dir and
// returns their paths.
func WriteIsthmus(b Build, dir string) ([]string, error) {
	if b.Tag == "" {
		return nil, fmt.Errorf("ociimage: the images need a tag")
	}
	var out []string
	for _, w := range []struct {
		file string
		img  Image
	}{{AgentTarball, b.AgentImage()}, {ClustermeshTarball, b.ClustermeshImage()}} {
		p := filepath.Join(dir, w.file)
		if err := Write(p, w.img); err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
