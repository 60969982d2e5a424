package main

import (
	"testing"

	"github.com/spf13/pflag"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/internal/docref"
)

// TestReferenceDocumentsEveryFlag keeps the "## isthmus-agent" section of
// docs/reference.md in step with the flags: each needs a table row that
// starts with "| `--name`" and shows a non-zero default as `default`.
// (cmd/isthmus and cmd/isthmus-clustermesh have the same test.)
func TestReferenceDocumentsEveryFlag(t *testing.T) {
	sec := docref.Section(t, "## isthmus-agent")
	newCommand(func(agent.Config) error { return nil }).Flags().VisitAll(func(f *pflag.Flag) {
		// A default that is this host's name differs between machines.
		docref.CheckFlagRow(t, `"## isthmus-agent"`, sec, f, f.DefValue != api.DefaultNodeName())
	})
}
