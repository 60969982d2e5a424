package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/isthmus-mesh/isthmus/lab"
)

func TestMain(m *testing.M) {
	// Build the binaries once, up front, so that no test's time budget pays
	// for the compiler. Without root every test skips and nothing is built.
	if os.Geteuid() == 0 {
		for _, b := range []string{lab.AgentBinary, lab.CLIBinary} {
			if _, err := lab.Binary(b); err != nil {
				fmt.Fprintln(os.Stderr, "e2e:", err)
				lab.CleanupBinaries()
				os.Exit(1)
			}
		}
	}
	code := m.Run()
	lab.CleanupBinaries()
	os.Exit(code)
}
