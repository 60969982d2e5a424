package main

import (
	"context"
	"testing"

	"github.com/spf13/pflag"

	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/internal/docref"
)

// TestReferenceDocumentsEveryFlag keeps the "## isthmus-clustermesh"
// section of docs/reference.md in step with the flags: each needs a table
// row that starts with "| `--name`" and shows a non-zero default as
// `default`. (cmd/isthmus and cmd/isthmus-agent have the same test.)
func TestReferenceDocumentsEveryFlag(t *testing.T) {
	sec := docref.Section(t, "## isthmus-clustermesh")
	newCommand(func(context.Context, server.Config) error { return nil }).Flags().VisitAll(func(f *pflag.Flag) {
		docref.CheckFlagRow(t, `"## isthmus-clustermesh"`, sec, f, true)
	})
}
