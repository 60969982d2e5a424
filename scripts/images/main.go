// Command images writes the Isthmus images (`make images`): the agent and
// clustermesh server as image tarballs, from static binaries, without a
// registry or docker (internal/ociimage). The tag defaults to the Helm
// chart's appVersion, so the chart's default values name these images.
//
//	CGO_ENABLED=0 go build -o bin/static/ ./cmd/...
//	go run ./scripts/images --bin bin/static --out bin/images
//	ctr -n k8s.io images import bin/images/isthmus-agent.tar
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/ociimage"
)

const chartFile = "deploy/helm/isthmus/Chart.yaml"

func main() {
	var b ociimage.Build
	var out string
	flag.StringVar(&b.BinDir, "bin", "bin/static", "directory with the static isthmus-agent, isthmus-cni, isthmus-clustermesh and isthmus")
	flag.StringVar(&out, "out", "bin/images", "directory the tarballs are written to")
	flag.StringVar(&b.Repository, "repository", ociimage.DefaultRepository, "image repository prefix: <repository>/agent, <repository>/clustermesh")
	flag.StringVar(&b.Tag, "tag", "", "image tag (default: the appVersion of "+chartFile+")")
	flag.StringVar(&b.Revision, "revision", "", "source revision label (default: git rev-parse HEAD, with -dirty for a modified tree)")
	flag.Parse()
	if err := run(b, out); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run(b ociimage.Build, out string) error {
	if b.Tag == "" {
		raw, err := os.ReadFile(chartFile)
		if err != nil {
			return fmt.Errorf("--tag not given and %w", err)
		}
		var chart struct {
			AppVersion string `json:"appVersion"`
		}
		if err := yaml.Unmarshal(raw, &chart); err != nil || chart.AppVersion == "" {
			return fmt.Errorf("--tag not given and no appVersion in %s (%v)", chartFile, err)
		}
		b.Tag = chart.AppVersion
	}
	if b.Revision == "" {
		b.Revision = gitRevision()
	}
	paths, err := ociimage.WriteIsthmus(b, out)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s\n%s: %s\n", paths[0], b.AgentRef(), paths[1], b.ClustermeshRef())
	return nil
}

func gitRevision() string {
	rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return ""
	}
	r := strings.TrimSpace(string(rev))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
		r += "-dirty"
	}
	return r
}
