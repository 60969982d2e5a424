package meshsync

import "testing"

// A node runs with its own credential; another node's or a remote
// cluster's is refused, the broad ones only warned about.
func TestCheckBundleUser(t *testing.T) {
	for _, c := range []struct {
		user          string
		warn, refused bool
	}{
		{"node-n1", false, false},
		{"agents", true, false},
		{"root", true, false},
		{"node-n2", false, true},
		{"node-n10", false, true},
		{"remote-c2", false, true},
		{"", false, true},
		{"node-n1.3", false, false}, // an external workload's enrollment user
		{"node-n1.0", false, true},
		{"node-n1.03", false, true},
		{"node-n1.x", false, true},
		{"node-n10.1", false, true},
	} {
		warning, err := CheckBundleUser(c.user, "n1")
		if (warning != "") != c.warn || (err != nil) != c.refused {
			t.Errorf("CheckBundleUser(%q, n1) = %q, %v; want warning %v, refused %v", c.user, warning, err, c.warn, c.refused)
		}
	}
}
