package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
)

// The checks of `isthmus connectivity test` must fail when what they check
// is broken. labNegatives breaks one thing of a running lab at a time (the
// lab of TestLabUpConnectivityDown), runs the test, wants exactly that
// check to FAIL for the right reason and every other one to PASS, and
// restores the lab:
//
//   - no policy: NetworkPolicy default/echo-from-echo deleted in every
//     cluster, so the denied pods get answers: "policy denies" fails;
//   - plaintext: the encryption rule (priority 73, lookup table 73) of the
//     capturing nodes deleted, again and again while the test runs since
//     the agent re-adds it, so their pods' traffic leaves through the main
//     table in the clear: "encryption (WireGuard)" fails;
//   - a backend missing: the last cluster's Service default/echo selects no
//     pod, so that cluster's backends leave the global service:
//     "global service from every cluster" fails.
func labNegatives(t *testing.T, st *lab.State, isthmus func(time.Duration, ...string) (string, error)) {
	mustCLI := func(args ...string) {
		t.Helper()
		if _, err := isthmus(time.Minute, args...); err != nil {
			t.Fatalf("isthmus %s: %v", strings.Join(args, " "), err)
		}
	}
	// The lab's own objects, as `lab up` applied them in every cluster.
	demo := filepath.Join(st.Dir, "demo-objects.yaml")
	if _, err := os.Stat(demo); err != nil {
		t.Fatalf("the lab's objects: %v", err)
	}
	policy := strings.TrimPrefix(st.Policy, "default/")

	step(t, "negative: NetworkPolicy %s deleted in every cluster: 'policy denies' must FAIL", st.Policy)
	for _, c := range st.Clusters {
		mustCLI("--socket", c.Nodes[0].Socket, "delete", "policy", policy)
	}
	if err := waitDenials(st, false); err != nil {
		t.Fatalf("without the policy: %v", err)
	}
	out, err := isthmus(3*time.Minute, "connectivity", "test", "-o", "json")
	if err == nil {
		t.Errorf("connectivity test without a policy exited 0")
	}
	expectOnlyFailing(t, out, "policy denies", "not denied: ", len(st.Clusters))
	for _, c := range st.Clusters {
		mustCLI("--socket", c.Nodes[0].Socket, "apply", "-f", demo)
	}
	if err := waitDenials(st, true); err != nil {
		t.Fatalf("policy re-applied: %v", err)
	}

	var capturing []lab.NodeOf // the encryption check captures on each cluster's first node
	for _, c := range st.Clusters {
		capturing = append(capturing, lab.NodeOf{Cluster: c.Name, StateNode: c.Nodes[0]})
	}
	step(t, "negative: the encryption rule of %d nodes deleted while the test runs (pod traffic in the clear): 'encryption (WireGuard)' must FAIL", len(capturing))
	restore := dropEncryptionRules(t, capturing)
	out, err = isthmus(3*time.Minute, "connectivity", "test", "-o", "json")
	restore()
	if err == nil {
		t.Errorf("connectivity test with plaintext pod traffic exited 0")
	}
	expectOnlyFailing(t, out, "encryption (WireGuard)", "in the clear", len(capturing))

	last := st.Clusters[len(st.Clusters)-1]
	step(t, "negative: Service %s/%s of %s selects no pod: 'global service from every cluster' must FAIL", st.Service.Namespace, st.Service.Name, last.Name)
	var vips []string
	for _, v := range st.Service.VIPs {
		vips = append(vips, `"`+v.String()+`"`)
	}
	noBackends := filepath.Join(t.TempDir(), "no-backends.yaml")
	if err := os.WriteFile(noBackends, fmt.Appendf(nil, `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: %s
  namespace: %s
  annotations: {isthmus.io/global: "true", isthmus.io/affinity: none}
spec:
  vips: [%s]
  ports: [{name: http, port: %d, targetPort: %d, protocol: TCP}]
  selector: {app: no-such-pod}
`, st.Service.Name, st.Service.Namespace, strings.Join(vips, ", "), st.Service.Port, st.Service.TargetPort), 0o644); err != nil {
		t.Fatal(err)
	}
	mustCLI("--socket", last.Nodes[0].Socket, "apply", "-f", noBackends)
	if err := waitServiceWithout(st, last.Name); err != nil {
		t.Fatalf("%s's backends still answer: %v", last.Name, err)
	}
	// The check sends until every cluster answered or --timeout passed.
	out, err = isthmus(3*time.Minute, "connectivity", "test", "-o", "json", "--timeout", "5s")
	if err == nil {
		t.Errorf("connectivity test without %s's backends exited 0", last.Name)
	}
	expectOnlyFailing(t, out, "global service from every cluster", "no answer from "+last.Name, len(st.Clusters)*len(st.Service.VIPs))
	mustCLI("--socket", last.Nodes[0].Socket, "apply", "-f", demo)
}

// labReport is what the tests read of `connectivity test -o json`.
type labReport struct {
	Results []struct {
		Check  string `json:"check"`
		From   string `json:"from"`
		Result string `json:"result"`
		Detail string `json:"detail"`
	} `json:"results"`
	Passed int `json:"passed"`
	Failed int `json:"failed"`
}

func parseReport(t *testing.T, out string) labReport {
	t.Helper()
	var rep labReport
	i := strings.Index(out, "{")
	if i < 0 {
		t.Fatalf("no JSON report in:\n%s", out)
	}
	// The first JSON value: after a failure, the CLI's "Error: ..." follows.
	if err := json.NewDecoder(strings.NewReader(out[i:])).Decode(&rep); err != nil {
		t.Fatalf("report: %v", err)
	}
	return rep
}

// expectOnlyFailing wants n results of check, each a FAIL whose detail
// holds want, and every other result a PASS.
func expectOnlyFailing(t *testing.T, out, check, want string, n int) {
	t.Helper()
	rep := parseReport(t, out)
	failed := 0
	for _, r := range rep.Results {
		switch {
		case r.Check == check && r.Result == "FAIL" && strings.Contains(r.Detail, want):
			failed++
			t.Logf("%s FAILED as it must: %s", check, r.Detail)
		case r.Check == check:
			t.Errorf("%s: %s %s; want FAIL with %q", check, r.Result, r.Detail, want)
		case r.Result != "PASS":
			t.Errorf("%s (not broken): %s %s", r.Check, r.Result, r.Detail)
		}
	}
	if failed != n {
		t.Errorf("%q failed %d times, want %d", check, failed, n)
	}
}

// waitDenials waits until every denied pod's connection attempts to every
// echo pod, over both families, time out (denied) or are answered (!denied).
func waitDenials(st *lab.State, denied bool) error {
	type probe struct {
		from lab.StatePod
		to   netip.AddrPort
	}
	var probes []probe
	for _, d := range st.Pods {
		if d.Role != connectivity.RoleDenied {
			continue
		}
		for _, e := range st.Pods {
			if e.Role != connectivity.RoleEcho {
				continue
			}
			for _, a := range e.Addrs() {
				probes = append(probes, probe{d, netip.AddrPortFrom(a, connectivity.EchoPort)})
			}
		}
	}
	return eventually(time.Minute, func() error {
		errs := make([]error, len(probes))
		var wg sync.WaitGroup
		for i, p := range probes {
			wg.Go(func() {
				reply, err := connectivity.FetchEcho(context.Background(), lab.NetnsPath(p.from.Netns), p.to, 500*time.Millisecond)
				switch ok, why := connectivity.Denial(reply, err); {
				case denied && !ok:
					errs[i] = fmt.Errorf("%s -> %s: %s", p.from.Name, p.to, why)
				case !denied && err != nil:
					errs[i] = fmt.Errorf("%s -> %s: %v", p.from.Name, p.to, err)
				}
			})
		}
		wg.Wait()
		return errors.Join(errs...)
	})
}

// waitServiceWithout waits until, from the first echo pod of every
// cluster, 20 requests in a row to every VIP are answered by other
// clusters than gone.
func waitServiceWithout(st *lab.State, gone string) error {
	for _, c := range st.Clusters {
		var from lab.StatePod
		for _, p := range st.Pods {
			if p.Cluster == c.Name && p.Role == connectivity.RoleEcho {
				from = p
				break
			}
		}
		for _, vip := range st.Service.VIPs {
			to := netip.AddrPortFrom(vip, uint16(st.Service.Port))
			inARow := 0
			deadline := time.Now().Add(time.Minute)
			for inARow < 20 {
				if time.Now().After(deadline) {
					return fmt.Errorf("%s -> %s: still answered by %s after a minute", from.Name, to, gone)
				}
				reply, err := connectivity.FetchEcho(context.Background(), lab.NetnsPath(from.Netns), to, 2*time.Second)
				switch {
				case err != nil:
					return fmt.Errorf("%s -> %s: %v", from.Name, to, err)
				case reply.Cluster == gone:
					inARow = 0
					time.Sleep(50 * time.Millisecond)
				default:
					inARow++
				}
			}
		}
	}
	return nil
}

// encryptionTable is the agent's routing table (and rule priority) of the
// tunnel routes (docs/encryption.md).
const encryptionTable = 73

// dropEncryptionRules deletes the rules that lead the nodes' pod traffic
// into the WireGuard table, and keeps deleting them (the agent re-adds
// them when it checks the kernel for drift) until the returned function
// is called, which puts them back.
func dropEncryptionRules(t *testing.T, nodes []lab.NodeOf) (restore func()) {
	t.Helper()
	type nodeRules struct {
		name  string
		h     *netlink.Handle
		saved []netlink.Rule
	}
	list := func(h *netlink.Handle) ([]netlink.Rule, error) {
		var out []netlink.Rule
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rs, err := h.RuleListFiltered(family, &netlink.Rule{Table: encryptionTable}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return nil, err
			}
			for _, r := range rs {
				if r.Priority == encryptionTable {
					r.Family = family
					out = append(out, r)
				}
			}
		}
		return out, nil
	}
	var all []*nodeRules
	for _, n := range nodes {
		ns, err := netns.GetFromPath(lab.NetnsPath(n.Netns))
		if err != nil {
			t.Fatal(err)
		}
		h, err := netlink.NewHandleAt(ns)
		ns.Close()
		if err != nil {
			t.Fatal(err)
		}
		rules, err := list(h)
		if err != nil || len(rules) == 0 {
			h.Close()
			t.Fatalf("encryption rules of %s: %v (%d found)", n.Name, err, len(rules))
		}
		all = append(all, &nodeRules{name: n.Name, h: h, saved: rules})
	}
	stop, done := make(chan struct{}), make(chan struct{})
	deleted := map[string]int{}
	go func() {
		defer close(done)
		for {
			for _, nr := range all {
				rules, _ := list(nr.h)
				for _, r := range rules {
					if err := nr.h.RuleDel(&r); err == nil {
						deleted[nr.name]++
					}
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	return func() {
		close(stop)
		<-done
		for _, nr := range all {
			// Once per rule is this test; more is the agent re-adding it.
			t.Logf("%s: deleted %d encryption rules (%d saved) while the test ran", nr.name, deleted[nr.name], len(nr.saved))
			for _, r := range nr.saved {
				if err := nr.h.RuleAdd(&r); err != nil && !errors.Is(err, unix.EEXIST) {
					t.Errorf("%s: put the encryption rule back: %v", nr.name, err)
				}
			}
			nr.h.Close()
		}
	}
}
