package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// A missing need skips outside CI and fails under CI: run a child test
// binary that asks for a tool that does not exist, both ways.
func TestSkipFailsUnderCI(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		Tool(t, "isthmus-no-such-tool", "none")
		return
	}
	for _, c := range []struct {
		ci       string
		wantFail bool
		want     string
	}{
		{"", false, "SKIP"},
		{"true", true, "CI=true"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSkipFailsUnderCI$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTENV_CHILD=1", "CI="+c.ci)
		out, err := cmd.CombinedOutput()
		if (err != nil) != c.wantFail || !strings.Contains(string(out), c.want) {
			t.Errorf("CI=%q: err=%v, want failure %v and %q in:\n%s", c.ci, err, c.wantFail, c.want, out)
		}
	}
}
