package main

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/agent/api"
)

// TestReferenceDocumentsEveryFlag keeps the "## isthmus-agent" section of
// docs/reference.md in step with the flags: each needs a table row that
// starts with "| `--name`" and shows a non-zero default as `default`.
// (cmd/isthmus and cmd/isthmus-clustermesh have the same test.)
func TestReferenceDocumentsEveryFlag(t *testing.T) {
	sec := referenceSection(t, "## isthmus-agent")
	newCommand(func(agent.Config) error { return nil }).Flags().VisitAll(func(f *pflag.Flag) {
		name := "--" + f.Name
		if f.Shorthand != "" {
			name = "-" + f.Shorthand + ", " + name
		}
		row := regexp.MustCompile("(?m)^\\| `" + regexp.QuoteMeta(name) + "` \\|.*$").FindString(sec)
		if row == "" {
			t.Errorf("docs/reference.md: no row \"| `%s` | default | meaning |\" under \"## isthmus-agent\"", name)
			return
		}
		d := strings.TrimSuffix(strings.TrimPrefix(f.DefValue, "["), "]")
		switch d {
		case "", "0", "0s", "false", api.DefaultNodeName(): // zero, or this host's
			return
		}
		if !strings.Contains(row, "`"+d+"`") {
			t.Errorf("docs/reference.md: the row of %s does not show its default `%s`:\n%s", name, d, row)
		}
	})
}

// referenceSection returns the part of docs/reference.md from heading to
// the next "## " heading.
func referenceSection(t *testing.T, heading string) string {
	t.Helper()
	data, err := os.ReadFile("../../docs/reference.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	start := strings.Index(doc, "\n"+heading+"\n")
	if start < 0 {
		t.Fatalf("docs/reference.md has no %q section", heading)
	}
	doc = doc[start+1:]
	if end := strings.Index(doc, "\n## "); end >= 0 {
		doc = doc[:end]
	}
	return doc
}
