package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// `isthmus lab up --bgp --l2 --vms 1`: the way in from outside over BGP
// (BIRD as each cluster's top-of-rack router, a client behind it) and over
// L2 (a client on each node segment), and an external workload; the
// connectivity test's north-south and pod <-> host checks pass, and fail
// when what they check is broken: the host revoked, the BGPPeeringPolicy
// of c1 and the L2AnnouncementPolicy of c2 deleted.
func TestLabUpNorthSouthAndVMs(t *testing.T) {
	cli, stateFile, isthmus, setPrefix := labCLI(t)
	var prefix string

	step(t, "isthmus lab up --bgp --l2 --vms 1")
	out, upErr := isthmus(5*time.Minute, "lab", "up", "--clusters", "2", "--nodes", "2", "--bgp", "--l2", "--vms", "1")
	st, err := lab.ReadState(stateFile)
	if err == nil {
		prefix = st.Prefix
		setPrefix(prefix)
	}
	if upErr != nil {
		t.Fatalf("lab up: %v", upErr)
	}
	if err != nil {
		t.Fatalf("lab up left no readable state: %v", err)
	}
	if len(st.Outside) != 4 || len(st.VMs) != 1 {
		t.Fatalf("state: %d outside clients, %d VMs; want 4 and 1", len(st.Outside), len(st.VMs))
	}
	for _, want := range []string{"0 failed", "north-south", "(BGP)", "(L2)", "external workload to pod"} {
		if !strings.Contains(out, want) {
			t.Errorf("lab up output lacks %q", want)
		}
	}
	out, err = isthmus(3*time.Minute, "connectivity", "test", "-o", "json")
	if err != nil {
		t.Fatalf("connectivity test: %v", err)
	}
	passed := map[string]int{}
	for _, r := range parseReport(t, out).Results {
		if r.Result != "PASS" {
			t.Errorf("%s: %s %s", r.Check, r.Result, r.Detail)
		}
		passed[r.Check]++
	}
	for check, want := range map[string]int{
		"north-south (outside to service address)": 8, // 2 clusters x 2 families x (BGP, L2)
		"pod to external workload":                 2, // from each cluster
		"external workload to pod":                 2,
	} {
		if passed[check] != want {
			t.Errorf("%q passed %d times, want %d", check, passed[check], want)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	c1, c2 := st.Clusters[0], st.Clusters[1]
	inCluster := func(c lab.StateCluster, args ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", c.Router, cli}, args...)...)
		cmd.Env = append(os.Environ(), "ISTHMUS_KVSTORE_ENDPOINTS="+c.Server, "ISTHMUS_KVSTORE_BUNDLE="+c.RootBundle)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("isthmus %s in %s: %v\n%s", strings.Join(args, " "), c.Name, err, out)
		}
	}

	vm := st.VMs[0]
	step(t, "negative: external workload %s revoked: the pod <-> host checks must FAIL, nothing else", vm.Workload)
	var vmCluster lab.StateCluster
	for _, c := range st.Clusters {
		if c.Name == vm.Cluster {
			vmCluster = c
		}
	}
	inCluster(vmCluster, "vm", "revoke", vm.Workload)
	out, err = isthmus(3*time.Minute, "connectivity", "test", "-o", "json", "--timeout", "5s")
	if err == nil {
		t.Errorf("connectivity test with the host revoked exited 0")
	}
	expectFailing(t, out, map[string]int{"pod to external workload": 2, "external workload to pod": 2})

	// Each cluster's addresses are reachable both ways: announced over BGP
	// to the router, and answered with ARP/NDP on the segment (which the
	// router falls back to through its connected route). c1 loses both,
	// c2 only L2: c1-out, c1-seg and c2-seg must fail, c2-out must not.
	step(t, "negative: %s's BGPPeeringPolicy announces no load-balancer address (pod CIDRs only) and its L2AnnouncementPolicy is deleted, as is %s's: every outside client but %s-out must FAIL", c1.Name, c2.Name, c2.Name)
	objs, err := os.ReadFile(filepath.Join(st.Dir, c1.Name+"-northsouth.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	podCIDRsOnly := strings.Replace(string(objs), "    - type: LoadBalancerIP\n", "", 1)
	if podCIDRsOnly == string(objs) {
		t.Fatalf("the lab's BGPPeeringPolicy announces no LoadBalancerIP:\n%s", objs)
	}
	f := filepath.Join(t.TempDir(), "pod-cidrs-only.yaml")
	if err := os.WriteFile(f, []byte(podCIDRsOnly), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := isthmus(time.Minute, "--socket", c1.Nodes[0].Socket, "apply", "-f", f); err != nil {
		t.Fatal(err)
	}
	for _, c := range []lab.StateCluster{c1, c2} {
		if _, err := isthmus(time.Minute, "--socket", c.Nodes[0].Socket, "delete", "l2policy", "lab"); err != nil {
			t.Fatal(err)
		}
	}
	// What the neighbours learned before stays in their caches for a
	// while (as on a real segment): forget it, so the next request asks.
	time.Sleep(time.Second) // the nodes have stopped answering
	flush := []string{c1.Router}
	for _, o := range st.Outside {
		if o.Via == "L2" {
			flush = append(flush, o.Netns)
		}
	}
	for _, ns := range flush {
		if out, err := exec.Command("ip", "-n", ns, "neigh", "flush", "all").CombinedOutput(); err != nil {
			t.Fatalf("ip -n %s neigh flush all: %v\n%s", ns, err, out)
		}
	}
	out, err = isthmus(3*time.Minute, "connectivity", "test", "-o", "json", "--timeout", "5s")
	if err == nil {
		t.Errorf("connectivity test without the announcements exited 0")
	}
	// Three clients lose both families; the host stays revoked.
	expectFailing(t, out, map[string]int{"north-south (outside to service address)": 6, "pod to external workload": 2, "external workload to pod": 2})
	for _, r := range parseReport(t, out).Results {
		if r.Check == "north-south (outside to service address)" && r.From == c2.Name+"-out" && r.Result != "PASS" {
			t.Errorf("north-south from %s (BGP, still announced): %s %s", r.From, r.Result, r.Detail)
		}
	}

	step(t, "isthmus lab down")
	if _, err := isthmus(time.Minute, "lab", "down"); err != nil {
		t.Fatalf("lab down: %v", err)
	}
	if left := labLeftovers(prefix); len(left) > 0 {
		t.Fatalf("lab down left: %s", strings.Join(left, "; "))
	}
	if m, _ := filepath.Glob(filepath.Join(lab.PinRoot, "vm-"+prefix+"*")); len(m) > 0 {
		t.Fatalf("lab down left the host's pins: %v", m)
	}
}

// expectFailing wants exactly n FAIL results of each check in fails and
// every other result PASS.
func expectFailing(t *testing.T, out string, fails map[string]int) {
	t.Helper()
	got := map[string]int{}
	for _, r := range parseReport(t, out).Results {
		if _, broken := fails[r.Check]; broken {
			if r.Result == "FAIL" {
				got[r.Check]++
				t.Logf("%s FAILED as it must: %s", r.Check, r.Detail)
			}
			continue
		}
		if r.Result != "PASS" {
			t.Errorf("%s (not broken): %s %s", r.Check, r.Result, r.Detail)
		}
	}
	for check, n := range fails {
		if got[check] != n {
			t.Errorf("%q failed %d times, want %d", check, got[check], n)
		}
	}
}
