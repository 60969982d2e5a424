package main

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
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
	data, err := os.ReadFile("../../docs/reference.md")
	if err != nil {
		t.Fatal(err)
	}
	sections := cliSections(t, string(data))
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
			checkFlagRow(t, cmd.CommandPath(), sec, f, f.Name != "socket")
		}
	})
}

func walkCommands(cmd *cobra.Command, fn func(*cobra.Command)) {
	fn(cmd)
	for _, sub := range cmd.Commands() {
		walkCommands(sub, fn)
	}
}

// cliSections maps the command paths that the headings of the CLI section
// of reference.md name to the text under each heading.
func cliSections(t *testing.T, doc string) map[string]string {
	t.Helper()
	start := strings.Index(doc, "\n## isthmus (CLI)\n")
	if start < 0 {
		t.Fatal(`docs/reference.md has no "## isthmus (CLI)" section`)
	}
	doc = doc[start+1:]
	if end := strings.Index(doc[1:], "\n## "); end >= 0 {
		doc = doc[:end+1]
	}
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

// checkFlagRow checks the table row of f in sec (and its default, when
// withDefault).
func checkFlagRow(t *testing.T, where, sec string, f *pflag.Flag, withDefault bool) {
	t.Helper()
	name := "--" + f.Name
	if f.Shorthand != "" {
		name = "-" + f.Shorthand + ", " + name
	}
	row := regexp.MustCompile("(?m)^\\| `" + regexp.QuoteMeta(name) + "` \\|.*$").FindString(sec)
	if row == "" {
		t.Errorf("docs/reference.md: no row \"| `%s` | default | meaning |\" in the section of %s", name, where)
		return
	}
	if def := defaultText(f); withDefault && def != "" && !strings.Contains(row, def) {
		t.Errorf("docs/reference.md: the row of %s %s does not show its default %s:\n%s", where, name, def, row)
	}
}

// defaultText is how the default of f must appear in its row, or "" for a
// zero default (documented in words: "(none)", "(off)", "`0`").
func defaultText(f *pflag.Flag) string {
	d := f.DefValue
	if strings.HasSuffix(f.Value.Type(), "Slice") {
		d = strings.TrimSuffix(strings.TrimPrefix(d, "["), "]")
	}
	switch d {
	case "", "0", "0s", "false":
		return ""
	}
	return "`" + d + "`"
}
