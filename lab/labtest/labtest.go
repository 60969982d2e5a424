// Package labtest is the glue between package lab and Go tests: labs that
// close themselves when the test ends, root checks, and the project's
// binaries built once per test binary (the product never builds them; see
// lab.FindBinaries).
package labtest

import (
	"testing"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
	"github.com/isthmus-mesh/isthmus/lab"
)

// New skips the test without root (fails under CI=true, see
// SkipUnlessRoot), creates a lab whose processes run the binaries Binaries
// builds, and closes it when the test ends — also after a failure or a
// panic, and on SIGINT/SIGTERM. When the test failed, the tail of every
// started process's log is logged first.
func New(tb testing.TB) *lab.Lab {
	tb.Helper()
	return NewWith(tb, lab.Options{})
}

// NewWith is New with options; Logf, Binaries and CloseOnSignal are set
// unless given.
func NewWith(tb testing.TB, o lab.Options) *lab.Lab {
	tb.Helper()
	SkipUnlessRoot(tb)
	if o.Logf == nil {
		o.Logf = tb.Logf
	}
	if o.Binaries == nil {
		o.Binaries = Binaries
	}
	o.CloseOnSignal = true
	l, err := lab.New(o)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			for _, p := range l.Procs() {
				tb.Logf("--- log of %s (%s) ---\n%s", p.Name(), p.LogPath(), lab.Tail(p.Log(), 8192))
			}
		}
		if err := l.Close(); err != nil {
			tb.Errorf("lab: close: %v", err)
		}
	})
	return l
}

// SkipUnlessRoot skips the test when not running as root. Under CI (env
// CI=true) it fails instead, so that lab tests never silently skip there.
func SkipUnlessRoot(tb testing.TB) {
	tb.Helper()
	testenv.Root(tb, "lab tests create network namespaces and veths; run with sudo, as CI does")
}

// Binary returns the path of one of the project's binaries (lab.AgentBinary,
// lab.ServerBinary, lab.CLIBinary), built by Binaries; it fails the test
// when they cannot be built.
func Binary(tb testing.TB, name string) string {
	tb.Helper()
	b, err := Binaries()
	if err != nil {
		tb.Fatal(err)
	}
	p, err := b.Path(name)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}
