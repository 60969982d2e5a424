package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The quick start as a user runs it: `isthmus lab up` (2 clusters x 2
// nodes, WireGuard), `isthmus connectivity test` against the lab and against
// its agents by socket, the checks failing when the lab is broken
// (labNegatives), then `isthmus lab down`, after which nothing of the lab
// may be left on the host. The lab state file is the test's own, so a
// developer's `make lab` on the same machine is not disturbed.
func TestLabUpConnectivityDown(t *testing.T) {
	cli, stateFile, isthmus, prefixOf := labCLI(t)
	var prefix string

	step(t, "isthmus lab up --clusters 2 --nodes 2 --encryption wireguard")
	start := time.Now()
	out, upErr := isthmus(5*time.Minute, "lab", "up", "--clusters", "2", "--nodes", "2", "--encryption", "wireguard")
	st, err := lab.ReadState(stateFile)
	if err == nil {
		prefix = st.Prefix
		prefixOf(prefix)
	}
	if upErr != nil {
		t.Fatalf("lab up: %v", upErr)
	}
	if err != nil {
		t.Fatalf("lab up left no readable state: %v", err)
	}
	t.Logf("lab %s up in %.1fs", prefix, time.Since(start).Seconds())
	if !st.Ready || len(st.Clusters) != 2 || len(st.Nodes()) != 4 || st.Encryption != "wireguard" {
		t.Fatalf("state: ready %v, %d clusters, %d nodes, encryption %q", st.Ready, len(st.Clusters), len(st.Nodes()), st.Encryption)
	}
	for _, want := range []string{"Connectivity test:", "0 failed", "handshakes", "Explore:"} {
		if !strings.Contains(out, want) {
			t.Errorf("lab up output lacks %q", want)
		}
	}

	step(t, "isthmus connectivity test (the lab)")
	out, err = isthmus(3*time.Minute, "connectivity", "test", "-o", "json")
	if err != nil {
		t.Fatalf("connectivity test: %v", err)
	}
	checkReport(t, out)

	step(t, "isthmus connectivity test --agent ... (its own pods, service and policy)")
	var args []string
	for _, n := range st.Nodes() {
		args = append(args, "--agent", n.Socket)
	}
	out, err = isthmus(3*time.Minute, append([]string{"connectivity", "test", "-o", "json"}, args...)...)
	if err != nil {
		t.Fatalf("connectivity test --agent: %v", err)
	}
	checkReport(t, out)
	// It removed what it created.
	if ns, _ := filepath.Glob(filepath.Join(lab.NetnsDir, "isthmus-ct-*")); len(ns) > 0 {
		t.Errorf("connectivity test left namespaces: %v", ns)
	}
	for _, n := range st.Nodes() {
		eps, err := exec.Command(cli, "--socket", n.Socket, "endpoint", "list", "-o", "json").Output()
		if err != nil {
			t.Fatalf("endpoint list on %s: %v", n.Name, err)
		}
		if bytes.Contains(eps, []byte("isthmus-connectivity")) {
			t.Errorf("connectivity test left endpoints on %s: %s", n.Name, eps)
		}
	}

	labNegatives(t, st, isthmus)
	if t.Failed() {
		t.FailNow()
	}

	step(t, "isthmus lab down")
	if _, err := isthmus(time.Minute, "lab", "down"); err != nil {
		t.Fatalf("lab down: %v", err)
	}
	if _, err := os.Stat(stateFile); !os.IsNotExist(err) {
		t.Errorf("state file still there after lab down (%v)", err)
	}
	if left := labLeftovers(prefix); len(left) > 0 {
		t.Fatalf("lab down left: %s", strings.Join(left, "; "))
	}
	// Idempotent. Without a state file, lab down removes every detached
	// lab on the host: not while someone else's (a developer's `make lab`)
	// is up.
	if others := lab.DetachedPrefixes(); len(others) > 0 {
		t.Logf("second lab down skipped: it would remove the other labs on this host (%s)", strings.Join(others, ", "))
		return
	}
	if _, err := isthmus(time.Minute, "lab", "down"); err != nil {
		t.Fatalf("second lab down: %v", err)
	}
}

// checkReport fails the test unless the JSON report has no failure and ran
// every kind of check, the encryption check included.
func checkReport(t *testing.T, out string) {
	t.Helper()
	rep := parseReport(t, out)
	passed := map[string]int{}
	for _, r := range rep.Results {
		if r.Result == "PASS" {
			passed[r.Check]++
		} else {
			t.Errorf("%s: %s %s", r.Check, r.Result, r.Detail)
		}
		// The denial covers both families, after the denied pod's own
		// network was proven.
		if r.Check == "policy denies" && r.Result == "PASS" && (!strings.Contains(r.Detail, "(IPv4 and IPv6)") || !strings.Contains(r.Detail, " reaches ")) {
			t.Errorf("%s: %s", r.Check, r.Detail)
		}
	}
	for check, want := range map[string]int{
		"pod to pod, same node":             4,
		"pod to pod, across nodes":          4,
		"pod to pod, across clusters":       2,
		"global service from every cluster": 4, // two clusters x two families
		"policy denies":                     2,
		"encryption (WireGuard)":            2,
	} {
		if passed[check] != want {
			t.Errorf("%q passed %d times, want %d", check, passed[check], want)
		}
	}
}

// labCLI runs the isthmus CLI (built for the test) with a lab state file
// of the test's own; the lab it records is removed when the test ends, also
// after a failure: lab down, then by prefix (tell it with setPrefix) in
// case the state file is gone or lab down itself failed.
func labCLI(t *testing.T) (cli, stateFile string, isthmus func(time.Duration, ...string) (string, error), setPrefix func(string)) {
	t.Helper()
	labtest.SkipUnlessRoot(t)
	cli = labtest.Binary(t, lab.CLIBinary)
	stateFile = filepath.Join(t.TempDir(), "lab.json")
	isthmus = func(timeout time.Duration, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, cli, args...)
		cmd.Env = append(os.Environ(), lab.EnvStateFile+"="+stateFile)
		start := time.Now()
		out, err := cmd.CombinedOutput()
		t.Logf("isthmus %s (%.1fs):\n%s", strings.Join(args, " "), time.Since(start).Seconds(), out)
		return string(out), err
	}
	var prefix string
	t.Cleanup(func() {
		if _, err := os.Stat(stateFile); err == nil {
			if _, err := isthmus(time.Minute, "lab", "down"); err != nil {
				t.Errorf("lab down in cleanup: %v", err)
			}
		}
		if prefix != "" {
			if err := lab.CleanupPrefix(prefix); err != nil {
				t.Errorf("cleanup of %s: %v", prefix, err)
			}
		}
	})
	return cli, stateFile, isthmus, func(p string) { prefix = p }
}

// labLeftovers lists what carries the prefix: namespaces, host links,
// pinned maps, WireGuard sockets, temp dirs, the owner record, processes.
func labLeftovers(prefix string) []string {
	var found []string
	for _, g := range []string{
		filepath.Join(lab.NetnsDir, prefix+"*"),
		filepath.Join(lab.PinRoot, prefix+"*"),
		filepath.Join(lab.WireGuardSockDir, prefix+"*"),
		filepath.Join(os.TempDir(), prefix+"-*"),
		filepath.Join("/run/isthmus-lab", prefix+"*"),
	} {
		m, _ := filepath.Glob(g)
		found = append(found, m...)
	}
	links, _ := netlink.LinkList()
	for _, lk := range links {
		if strings.HasPrefix(lk.Attrs().Name, prefix) {
			found = append(found, "link "+lk.Attrs().Name)
		}
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := "/proc/" + e.Name()
		if stat, err := os.ReadFile(dir + "/stat"); err != nil || zombie(stat) {
			continue
		}
		env, _ := os.ReadFile(dir + "/environ")
		cmdline, _ := os.ReadFile(dir + "/cmdline")
		if bytes.Contains(env, []byte(lab.EnvPrefix+"="+prefix)) || bytes.Contains(cmdline, []byte(prefix)) {
			found = append(found, "process "+e.Name()+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return found
}

func zombie(stat []byte) bool {
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && (stat[i+2] == 'Z' || stat[i+2] == 'X')
}
