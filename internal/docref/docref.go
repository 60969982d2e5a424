// Package docref helps the docs tests of the commands (cmd/isthmus,
// cmd/isthmus-agent, cmd/isthmus-clustermesh) keep docs/reference.md in
// step with their flags: it cuts a section out of the reference and checks
// a flag's table row in it.
package docref

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// path is docs/reference.md seen from a test in cmd/<name>.
const path = "../../docs/reference.md"

// Section returns the part of docs/reference.md from the line heading
// (e.g. "## isthmus-agent") to the next "## " heading.
func Section(t testing.TB, heading string) string {
	t.Helper()
	data, err := os.ReadFile(path)
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

// CheckFlagRow checks that sec has a table row for f that starts with
// "| `--name` |" or "| `-n, --name` |" and, when withDefault, that the row
// shows a non-zero default as `default`. where names the command or
// section in the messages.
func CheckFlagRow(t testing.TB, where, sec string, f *pflag.Flag, withDefault bool) {
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
