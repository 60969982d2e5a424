package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

func TestMain(m *testing.M) {
	// Build the binaries once, up front, so that no test's time budget pays
	// for the compiler. Without root every test skips and nothing is built.
	if os.Geteuid() == 0 {
		if _, err := labtest.Binaries(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			labtest.Cleanup()
			os.Exit(1)
		}
	}
	code := m.Run()
	labtest.Cleanup()
	os.Exit(code)
}
