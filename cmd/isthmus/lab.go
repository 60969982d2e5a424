package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
)

// `isthmus lab` runs a demo mesh on this machine with package lab
// (see docs/lab.md). `lab up` leaves the lab running (a detached lab: its
// processes outlive the command) and records it in the state file
// (lab.StateFile), which the other verbs and `isthmus connectivity test`
// read. One lab per state file.

func (c *cli) labCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run a demo mesh on this machine: clusters of nodes in network namespaces",
		Long: `isthmus lab builds a complete mesh on this machine out of network namespaces:
a fabric router, clusters on separate subnets, an agent on every node, one
isthmus-clustermesh server per cluster, echo pods, a global service and a
policy. Needs root. See docs/lab.md.`,
	}
	cmd.AddCommand(c.labUpCommand(), c.labStatusCommand(), c.labExecCommand(), c.labDownCommand(), c.labEchoServerCommand())
	return cmd
}

func (c *cli) labUpCommand() *cobra.Command {
	o := lab.UpOptions{}
	var skipTest bool
	cmd := &cobra.Command{
		Use:   "up [--clusters 2] [--nodes 2] [--pods-per-node 2] [--encryption wireguard|none]",
		Short: "Build the lab, connect the clusters, wait until synced, run the connectivity test",
		Long: `Build a mesh in network namespaces and leave it running:

  a fabric router; per cluster a router with the cluster's subnet
  (10.(100+i).0.0/24), its isthmus-clustermesh server (embedded etcd) and
  --nodes nodes, each running isthmus-agent in cluster mode
  every pair of clusters connected ('isthmus clustermesh connect')
  --pods-per-node echo pods per node (app=echo, an HTTP server answering
  with its pod, node and cluster) and one denied pod per cluster (app=denied)
  Service default/echo, global, on 10.96.0.100 and fd00:96::100 port 80
  NetworkPolicy default/echo-from-echo: echo pods admit only echo pods

Then it waits until every agent sees the whole mesh, runs 'isthmus
connectivity test' and prints a summary. Exits non-zero when the build or a
check fails (a lab whose checks failed stays up for debugging). Only one lab
at a time: remove it with 'isthmus lab down'.`,
		Example: `  isthmus lab up
  isthmus lab up --clusters 3 --nodes 1 --encryption none`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("lab up needs root (network namespaces, BPF)")
			}
			path := lab.StateFile()
			if err := reserveStateFile(path); err != nil {
				return err
			}
			o.Detached, o.StateFile = true, path
			o.Progress = func(format string, args ...any) { fmt.Fprintf(c.out, "==> "+format+"\n", args...) }
			start := time.Now()
			_, st, err := lab.Up(cmd.Context(), o)
			if err != nil {
				os.Remove(path) // Up removes it, but not when it failed before creating the lab
				return fmt.Errorf("lab up failed; what it built was removed: %w", err)
			}
			readyIn := time.Since(start)
			var rep *connectivityReport
			if !skipTest {
				o.Progress("running the connectivity test")
				t, err := newLabTarget(cmd.Context(), st)
				if err != nil {
					return fmt.Errorf("%w (the lab stays up; 'isthmus lab down' removes it)", err)
				}
				r := runChecks(cmd.Context(), t, connectivityOptions{timeout: 30 * time.Second, denyTimeout: 2 * time.Second})
				rep = &r
			}
			fmt.Fprintln(c.out)
			v := readLabView(cmd.Context(), st)
			v.Connectivity = rep
			if err := printLabView(c.out, v, fmt.Sprintf("is up (ready in %.1fs, total %.1fs)", readyIn.Seconds(), time.Since(start).Seconds())); err != nil {
				return err
			}
			if rep != nil && rep.Failed > 0 {
				return fmt.Errorf("connectivity test: %d of %d checks failed; the lab stays up for debugging ('isthmus lab down' removes it)", rep.Failed, len(rep.Results))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Clusters, "clusters", 2, "clusters (1-9)")
	f.IntVar(&o.Nodes, "nodes", 2, "nodes per cluster (1-20)")
	f.IntVar(&o.PodsPerNode, "pods-per-node", 2, "echo pods per node (1-20)")
	f.StringVar(&o.Encryption, "encryption", "wireguard", "transparent encryption between nodes: wireguard or none")
	f.DurationVar(&o.Timeout, "timeout", 3*time.Minute, "how long to wait for the mesh to sync")
	f.BoolVar(&skipTest, "skip-test", false, "do not run the connectivity test")
	return cmd
}

// reserveStateFile creates the state file empty, or says which lab is up.
func reserveStateFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err == nil {
		return f.Close()
	}
	if !errors.Is(err, os.ErrExist) {
		return err
	}
	if st, rerr := lab.ReadState(path); rerr == nil {
		return fmt.Errorf("lab %s is already up (since %s, state %s): run 'isthmus lab down' first",
			st.Prefix, st.Created.Local().Format(time.DateTime), path)
	}
	return fmt.Errorf("a lab is being built or its 'lab up' died (state %s): run 'isthmus lab down' first", path)
}

func (c *cli) labStatusCommand() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the lab: clusters, nodes, pods, tunnels and what is not synced",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkFormat(format); err != nil {
				return err
			}
			st, err := readLabState()
			if err != nil {
				return err
			}
			v := readLabView(cmd.Context(), st)
			if format != formatTable {
				return printData(c.out, format, v)
			}
			state := "is up"
			if !st.Ready {
				state = "is being built (or its 'lab up' died)"
			}
			return printLabView(c.out, v, state)
		},
	}
	addOutputFlag(cmd, &format)
	return cmd
}

func readLabState() (*lab.State, error) {
	st, err := lab.ReadState(lab.StateFile())
	if errors.Is(err, os.ErrNotExist) {
		return nil, errors.New("no lab is up ('isthmus lab up' builds one)")
	}
	return st, err
}

func (c *cli) labExecCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "exec POD|NODE -- COMMAND [ARG...]",
		Short: "Run a command in the network namespace of a lab pod, node or router",
		Example: `  isthmus lab exec c1-n1-echo1 -- curl -s http://10.96.0.100/
  isthmus lab exec c1-n1 -- ip route
  isthmus lab exec c1-denied -- curl -s -m 2 http://10.96.0.100/`,
		Args: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 || len(args) < 2 {
				return errors.New("usage: isthmus lab exec POD|NODE -- COMMAND [ARG...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := readLabState()
			if err != nil {
				return err
			}
			ns, ok := st.FindNetns(args[0])
			if !ok {
				var names []string
				for _, p := range st.Pods {
					names = append(names, p.Name)
				}
				for _, n := range st.Nodes() {
					names = append(names, n.Name)
				}
				return fmt.Errorf("lab %s has no pod or node %q (pods and nodes: %s)", st.Prefix, args[0], strings.Join(names, ", "))
			}
			nsenter, err := exec.LookPath("nsenter")
			if err != nil {
				return err
			}
			// nsenter --net, not `ip netns exec`: the latter remounts /sys.
			// The prefix in the environment lets 'lab down' find what
			// the command leaves running.
			argv := append([]string{"nsenter", "--net=" + lab.NetnsPath(ns), "--"}, args[1:]...)
			return syscall.Exec(nsenter, argv, append(os.Environ(), lab.EnvPrefix+"="+st.Prefix))
		},
	}
}

func (c *cli) labDownCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove the lab: processes, namespaces, links, pinned maps, sockets, files (idempotent)",
		Long: `Remove the lab of 'isthmus lab up' by its prefix: every process in its
namespaces or started for it, its network namespaces, host links, pinned BPF
maps and links, WireGuard sockets, its directory and the state file. Without
a state file it removes the leftovers of crashed runs instead: every lab of
'lab up' and every lab whose owning process is gone.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("lab down needs root")
			}
			path := lab.StateFile()
			st, err := lab.ReadState(path)
			var prefixes []string
			switch {
			case err == nil:
				prefixes = []string{st.Prefix}
			case errors.Is(err, os.ErrNotExist):
				prefixes = lab.DetachedPrefixes()
				if len(prefixes) == 0 {
					fmt.Fprintln(c.out, "no lab is up; removing leftovers of crashed lab runs, if any")
				}
			default:
				fmt.Fprintf(c.out, "unreadable state (%v); removing every lab of 'lab up'\n", err)
				prefixes = lab.DetachedPrefixes()
			}
			var errs []error
			for _, p := range prefixes {
				fmt.Fprintf(c.out, "removing lab %s\n", p)
				if err := lab.CleanupPrefix(p); err != nil {
					errs = append(errs, err)
				}
			}
			if err := lab.CleanupStale(); err != nil {
				errs = append(errs, err)
			}
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			if err := errors.Join(errs...); err != nil {
				return err
			}
			fmt.Fprintln(c.out, "done")
			return nil
		},
	}
}

// labView is the lab with every agent's status (lab status -o json).
type labView struct {
	State        *lab.State          `json:"state"`
	Problems     []string            `json:"problems"`
	Nodes        []labNodeView       `json:"nodes"`
	Connectivity *connectivityReport `json:"connectivity,omitempty"`
}

type labNodeView struct {
	Cluster string      `json:"cluster"`
	Node    string      `json:"node"`
	Socket  string      `json:"socket"`
	Error   string      `json:"error,omitempty"`
	Status  *api.Status `json:"status,omitempty"`
}

func readLabView(ctx context.Context, st *lab.State) labView {
	v := labView{State: st, Problems: st.Check(ctx)}
	nodes := st.Nodes()
	v.Nodes = make([]labNodeView, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			nv := labNodeView{Cluster: n.Cluster, Node: n.Name, Socket: n.Socket}
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			s, err := api.NewClient(n.Socket).Status(cctx)
			if err != nil {
				nv.Error = err.Error()
			} else {
				nv.Status = &s
			}
			v.Nodes[i] = nv
		})
	}
	wg.Wait()
	return v
}

// printLabView is the summary of `lab up` and `lab status`.
func printLabView(w io.Writer, v labView, state string) error {
	st := v.State
	echo, denied := 0, 0
	for _, p := range st.Pods {
		if p.Role == lab.RoleEcho {
			echo++
		} else {
			denied++
		}
	}
	fmt.Fprintf(w, "Lab %s %s: %d clusters, %d nodes, %d echo pods, %d denied pods, encryption %s\n",
		st.Prefix, state, len(st.Clusters), len(v.Nodes), echo, denied, st.Encryption)
	fmt.Fprintf(w, "Directory %s (logs in logs/), state %s\n", st.Dir, lab.StateFile())

	// The mesh as the first reachable agent sees it.
	var view []api.ClusterSummary
	for _, n := range v.Nodes {
		if n.Status != nil && n.Status.ClusterMesh != nil {
			view = n.Status.ClusterMesh.Clusters
			break
		}
	}
	fmt.Fprintln(w, "\nClusters:")
	t := newTable(w)
	fmt.Fprintln(t, "  CLUSTER\tID\tSERVER\tSYNCED\tNODES\tENDPOINTS\tIDENTITIES\tSERVICES")
	for _, c := range st.Clusters {
		row := fmt.Sprintf("  %s\t%d\t%s\t", c.Name, c.ID, c.Server)
		found := false
		for _, s := range view {
			if s.Name == c.Name {
				row += fmt.Sprintf("%s\t%d\t%d\t%d\t%d", yesNo(s.Synced), s.Nodes, s.Endpoints, s.Identities, s.Services)
				found = true
			}
		}
		if !found {
			row += "unknown\t-\t-\t-\t-"
		}
		fmt.Fprintln(t, row)
	}
	if err := t.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w, "\nNodes:")
	t = newTable(w)
	fmt.Fprintln(t, "  NODE\tCLUSTER\tUNDERLAY\tENDPOINTS\tDATAPATH\tWIREGUARD\tSOCKET")
	nodes := st.Nodes()
	for i, n := range v.Nodes {
		dp, wg, eps := "UNREACHABLE: "+n.Error, "-", "-"
		if s := n.Status; s != nil {
			eps = fmt.Sprint(s.Endpoints)
			dp = "in sync"
			if s.Reconcile.LastError != "" {
				dp = "FAILING: " + s.Reconcile.LastError
			}
			wg = wireguardSummary(s.WireGuard)
		}
		fmt.Fprintf(t, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Node, n.Cluster, joinAddrs(nodes[i].IPs), eps, dp, wg, n.Socket)
	}
	if err := t.Flush(); err != nil {
		return err
	}

	fmt.Fprintln(w, "\nPods:")
	t = newTable(w)
	fmt.Fprintln(t, "  POD\tCLUSTER\tNODE\tLABELS\tIPV4\tIPV6")
	for _, p := range st.Pods {
		fmt.Fprintf(t, "  %s\t%s\t%s\tapp=%s\t%s\t%s\n", p.Name, p.Cluster, p.Node, p.Labels["app"], p.IPv4, p.IPv6)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	var vips []string
	for _, a := range st.Service.VIPs {
		vips = append(vips, netip.AddrPortFrom(a, uint16(st.Service.Port)).String())
	}
	fmt.Fprintf(w, "\nService %s/%s (global, in every cluster): %s -> app=echo port %d\n", st.Service.Namespace, st.Service.Name, strings.Join(vips, ", "), st.Service.TargetPort)
	fmt.Fprintf(w, "NetworkPolicy %s: app=echo pods admit tcp/%d only from app=echo pods (of any cluster)\n", st.Policy, lab.EchoPort)

	if len(v.Problems) > 0 {
		fmt.Fprintln(w, "\nNot ready:")
		for _, p := range v.Problems {
			fmt.Fprintf(w, "  %s\n", p)
		}
	}
	if v.Connectivity != nil {
		fmt.Fprintln(w, "\nConnectivity test:")
		if err := printReport(w, *v.Connectivity); err != nil {
			return err
		}
	}

	if len(st.Pods) > 0 && len(st.Clusters) > 0 {
		first, sock := st.Pods[0], st.Clusters[0].Nodes[0].Socket
		var remote lab.StatePod
		for _, p := range st.Pods {
			if p.Role == lab.RoleEcho && p.Cluster != first.Cluster {
				remote = p
				break
			}
		}
		if !remote.IPv4.IsValid() {
			remote = first
		}
		vip := "10.96.0.100"
		if len(st.Service.VIPs) > 0 {
			vip = st.Service.VIPs[0].String()
		}
		fmt.Fprintf(w, `
Explore:
  # the global service (every cluster answers), a pod of another cluster, a denied pod
  isthmus lab exec %[1]s -- curl -s http://%[2]s/
  isthmus lab exec %[1]s -- curl -s http://%[3]s:%[4]d/
  isthmus lab exec %[5]s-denied -- curl -s -m 2 http://%[2]s/
  # a node's routes; an agent; the checks again
  isthmus lab exec %[6]s -- ip route
  isthmus --socket %[7]s status
  isthmus connectivity test
  isthmus lab status
  isthmus lab down
`, first.Name, vip, remote.IPv4, lab.EchoPort, st.Clusters[0].Name, st.Clusters[0].Nodes[0].Name, sock)
	}
	return nil
}

func wireguardSummary(wg *api.WireGuardStatus) string {
	if wg == nil {
		return "off"
	}
	hs := 0
	var rx, tx int64
	for _, p := range wg.Peers {
		if !p.LastHandshake.IsZero() {
			hs++
		}
		rx += p.RxBytes
		tx += p.TxBytes
	}
	s := fmt.Sprintf("%s port %d: %d peers, %d handshakes, rx %s, tx %s", wg.Mode, wg.ListenPort, len(wg.Peers), hs, humanBytes(rx), humanBytes(tx))
	if wg.LastError != "" {
		s += " (error: " + wg.LastError + ")"
	}
	return s
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
