package labtest_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// A lab of labtest.New is gone when its test ends.
func TestNewClosesWhenTheTestEnds(t *testing.T) {
	labtest.SkipUnlessRoot(t)
	var prefix, dir string
	t.Run("inner", func(t *testing.T) {
		l := labtest.New(t)
		if _, err := l.AddNode("n1"); err != nil {
			t.Fatal(err)
		}
		prefix, dir = l.Prefix(), l.Dir()
		if _, err := os.Stat(filepath.Join(lab.NetnsDir, l.Name("n1"))); err != nil {
			t.Fatal(err)
		}
	})
	if _, err := os.Stat(filepath.Join(lab.NetnsDir, prefix+"-n1")); !os.IsNotExist(err) {
		t.Errorf("netns of %s still there after the test: %v", prefix, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("dir %s still there after the test: %v", dir, err)
	}
}
