// Package testenv lets a test say what it needs from the machine: root, a
// tool from a Debian package. Where that is missing the test skips, except
// under CI (env CI=true, which .ci/run exports): CI runs as root with every
// tool `make deps` installs, so a missing need there is a broken machine or
// a missing install step, and the test fails instead of passing silently.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI (CI=true).
func InCI() bool { return os.Getenv("CI") == "true" }

// Skip skips the test with the message, or fails it under CI.
func Skip(tb testing.TB, format string, args ...any) {
	tb.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		tb.Fatalf("%s (CI=true: tests that need this must run, not skip)", msg)
	}
	tb.Skip(msg)
}

// Root skips (fails under CI) unless the test runs as root; why says what
// needs it.
func Root(tb testing.TB, why string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		Skip(tb, "needs root (%s)", why)
	}
}

// Tool returns the path of the command name, and skips (fails under CI)
// when it is not installed; pkg is the Debian package that has it.
func Tool(tb testing.TB, name, pkg string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Skip(tb, "%s not found (Debian package %s; make deps installs it)", name, pkg)
	}
	return p
}
