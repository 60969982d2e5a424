package main

import (
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/isthmus-mesh/isthmus/internal/docref"
)

// TestReferenceDocumentsEveryCommand keeps docs/reference.md in step with
// the CLI: every visible command that runs or has flags needs a heading
// ("### endpoint add", "#### clustermesh status"; "a b|c" documents "a b"
// and "a c"), and every flag a table row in its command's section (up to
// the next heading) that starts with "| `--name`" or "| `-n, --name`" and
// shows a non-zero default as `default`.
func TestReferenceDocumentsEveryCommand(t *testing.T) {
	// Defaults from the environment would differ between machines.
	t.Setenv("ISTHMUS_SOCKET", "")
	t.Setenv(envKVStoreEndpoints, "")
	t.Setenv(envKVStoreBundle, "")
	sections := cliSections(docref.Section(t, "## isthmus (CLI)"))
	root := newRootCommand(strings.NewReader(""), &strings.Builder{})
	walkCommands(root, func(cmd *cobra.Command) {
		if cmd.Hidden || cmd.Name() == "help" {
			return
		}
		path := strings.TrimSpace(subPath(cmd))
		if path == "" {
			path = root.Name()
		}
		var flags []*pflag.Flag
		cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
			if f.Name != "help" {
				flags = append(flags, f)
			}
		})
		if cmd.HasSubCommands() && len(flags) == 0 {
			return // a group: its sub-commands are documented
		}
		sec, ok := sections[path]
		if !ok {
			t.Errorf("docs/reference.md has no heading for %q (the CLI section wants e.g. \"### %s\")", cmd.CommandPath(), path)
			return
		}
		for _, f := range flags {
			// The default of --socket is the socket named after this host.
			docref.CheckFlagRow(t, cmd.CommandPath(), sec, f, f.Name != "socket")
		}
	})
}

func walkCommands(cmd *cobra.Command, fn func(*cobra.Command)) {
	fn(cmd)
	for _, sub := range cmd.Commands() {
		walkCommands(sub, fn)
	}
}

// cliSections maps the command paths that the headings of doc, the CLI
// section of reference.md, name to the text under each heading.
func cliSections(doc string) map[string]string {
	heading := regexp.MustCompile(`(?m)^#{2,6} (.*)$`)
	locs := heading.FindAllStringSubmatchIndex(doc, -1)
	out := map[string]string{}
	for i, loc := range locs {
		end := len(doc)
		if i+1 < len(locs) {
			end = locs[i+1][0]
		}
		title := doc[loc[2]:loc[3]]
		if p := strings.Index(title, " ("); p >= 0 {
			title = title[:p] // "(aliases ...)"
		}
		words := strings.Fields(strings.ReplaceAll(title, "`", ""))
		if len(words) == 0 {
			continue
		}
		last := len(words) - 1
		for _, alt := range strings.Split(words[last], "|") {
			words[last] = alt
			out[strings.Join(words, " ")] = doc[loc[1]:end]
		}
	}
	return out
}
