package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/kube"
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
	cmd.AddCommand(c.labUpCommand(), c.labStatusCommand(), c.labExecCommand(), c.labKubectlCommand(), c.labDownCommand(), c.labEchoServerCommand())
	return cmd
}

func (c *cli) labUpCommand() *cobra.Command {
	o := lab.UpOptions{}
	var skipTest, kubernetes bool
	var chart string
	cmd := &cobra.Command{
		Use:   "up [--clusters 2] [--nodes 2] [--pods-per-node 2] [--encryption wireguard|none] [--bgp] [--l2] [--vms N]",
		Short: "Build the lab, connect the clusters, wait until synced, run the connectivity test",
		Long: `Build a mesh in network namespaces and leave it running:

  a fabric router; per cluster a router with the cluster's subnet
  (10.(100+i).0.0/24), its isthmus-clustermesh server (embedded etcd) and
  --nodes nodes, each running isthmus-agent in cluster mode
  every pair of clusters connected ('isthmus clustermesh connect')
  --pods-per-node echo pods per node (app=echo, an HTTP server answering
  with its pod, node and cluster) and one denied pod per cluster (app=denied,
  the same server: no policy selects it, so other pods can reach it)
  Service default/echo, global, on 10.96.0.100 and fd00:96::100 port 80
  NetworkPolicy default/echo-from-echo: echo pods admit only echo pods

With --bgp, each cluster's router runs BIRD as its top-of-rack router
(AS 65000), peered over IPv4 and IPv6 with every node (AS 65100+i, a
BGPPeeringPolicy announcing pod CIDRs and load-balancer addresses, no
static pod routes); the echo service is of type LoadBalancer with one
address per family from the cluster's LoadBalancerIPPool
(10.(100+i).0.240/28, fd10:i::f0/124); and a client outside the mesh sits
behind each router (c<i>-out): the connectivity test's north-south check
sends it through the address to the backends of every cluster.

With --l2, the same addresses are answered with ARP and NDP on each
cluster's node segment by one node at a time (an L2AnnouncementPolicy),
and a client outside the mesh sits on that segment (c<i>-seg).

With --vms N, N hosts behind the fabric (vm1..vmN, spread over the
clusters) join with one-time tokens ('isthmus vm token create', then
'isthmus-agent --join'), labelled app=vm (the policy admits them to the
echo pods), each running the echo server on its mesh addresses: the
connectivity test checks pod <-> host both ways.

With --kubernetes, every cluster is a real Kubernetes cluster
(kube-apiserver, kube-controller-manager and kube-scheduler in its router;
containerd and a kubelet on every node) with Isthmus installed by its own
Helm chart (deploy/helm/isthmus, --chart) from images packaged from the
static binaries next to this one; the clusters are connected with
'isthmus clustermesh connect --kubeconfig ... --remote-kubeconfig ...';
the echo and denied pods are Kubernetes pods (real containers), the
service a global Kubernetes Service (ClusterIPs 10.96.0.100 and
fd00:10:96::100) and the policy a networking.k8s.io NetworkPolicy. It needs
'make lab LAB_ARGS=--kubernetes', which builds the static binaries, the
Kubernetes binaries (once, about ten minutes on two cores) and Helm; 'isthmus
lab kubectl CLUSTER -- ARGS' runs kubectl against a cluster. --bgp, --l2
and --vms are not available with it yet.

Then it waits until every agent sees the whole mesh, runs 'isthmus
connectivity test' and prints a summary. Exits non-zero when the build or a
check fails (a lab whose checks failed stays up for debugging). Only one lab
at a time: remove it with 'isthmus lab down'.`,
		Example: `  isthmus lab up
  isthmus lab up --bgp
  isthmus lab up --l2 --vms 2
  isthmus lab up --clusters 3 --nodes 1 --encryption none
  isthmus lab up --kubernetes`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("lab up needs root (network namespaces, BPF)")
			}
			if kubernetes && (o.BGP || o.L2 || o.VMs > 0) {
				return errors.New("--kubernetes does not take --bgp, --l2 or --vms yet: drop them, or drop --kubernetes")
			}
			if chart != "" && !kubernetes {
				return errors.New("--chart is the Helm chart of --kubernetes: add --kubernetes or drop --chart")
			}
			// The binaries first: a missing one is the user's next step.
			bins, err := lab.FindBinaries()
			if err != nil {
				return err
			}
			path := lab.StateFile()
			if err := reserveStateFile(path); err != nil {
				return err
			}
			o.Detached, o.StateFile = true, path
			o.Binaries = func() (lab.Binaries, error) { return bins, nil }
			o.Progress = func(format string, args ...any) { fmt.Fprintf(c.out, "==> "+format+"\n", args...) }
			start := time.Now()
			var st *lab.State
			if kubernetes {
				ko := kube.UpOptions{Clusters: o.Clusters, Nodes: o.Nodes, PodsPerNode: o.PodsPerNode, Encryption: o.Encryption,
					Chart: chart, Detached: true, StateFile: path, Binaries: o.Binaries, Progress: o.Progress}
				if cmd.Flags().Changed("timeout") {
					ko.Timeout = o.Timeout
				}
				_, st, err = kube.Up(cmd.Context(), ko)
			} else {
				_, st, err = lab.Up(cmd.Context(), o)
			}
			if err != nil {
				os.Remove(path) // Up removes it, but not when it failed before creating the lab
				return fmt.Errorf("lab up failed; what it built was removed: %w", err)
			}
			readyIn := time.Since(start)
			var rep *connectivity.Report
			if !skipTest {
				o.Progress("running the connectivity test")
				t, err := st.ConnectivityTarget(cmd.Context())
				if err != nil {
					return fmt.Errorf("%w (the lab stays up; 'isthmus lab down' removes it)", err)
				}
				r := connectivity.Run(cmd.Context(), t, connectivity.Options{})
				rep = &r
			}
			fmt.Fprintln(c.out)
			v := st.View(cmd.Context())
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
	f.BoolVar(&o.BGP, "bgp", false, "north-south over BGP: BIRD as every cluster's top-of-rack router peered with every node, the echo service of type LoadBalancer, and a client outside the mesh behind each router (checked by the connectivity test)")
	f.BoolVar(&o.L2, "l2", false, "north-south over L2: a client outside the mesh on every cluster's node segment (c<i>-seg), the echo service of type LoadBalancer answered there with ARP and NDP (an L2AnnouncementPolicy), checked by the connectivity test")
	f.IntVar(&o.VMs, "vms", 0, "external workloads (0-20): hosts behind the fabric enrolled with one-time tokens (isthmus-agent --join), spread over the clusters, labelled app=vm, each running the echo server; the connectivity test checks pod <-> host")
	f.BoolVar(&kubernetes, "kubernetes", false, "real Kubernetes clusters (control plane in each router, containerd and kubelet on each node) with Isthmus installed by its Helm chart (needs 'make lab LAB_ARGS=--kubernetes'); at most 4 clusters of 4 nodes")
	f.StringVar(&chart, "chart", "", "with --kubernetes: the Helm chart's directory (default: deploy/helm/isthmus of the source tree)")
	f.DurationVar(&o.Timeout, "timeout", 3*time.Minute, "how long to wait for the mesh to sync (with --kubernetes default 5m, also for each install)")
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
			v := st.View(cmd.Context())
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

func (c *cli) labKubectlCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "kubectl CLUSTER -- [KUBECTL ARG...]",
		Short: "Run kubectl against a cluster of a Kubernetes lab (lab up --kubernetes)",
		Long: `Run kubectl as the cluster's admin, in the cluster's router namespace, where
its API server listens (the host's namespace does not reach it).`,
		Example: `  isthmus lab kubectl c1 -- get pods -A -o wide
  isthmus lab kubectl c2 -- -n kube-system logs ds/isthmus-agent
  isthmus lab kubectl c1 -- exec c1-n1-echo1 -- /isthmus version`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || (cmd.ArgsLenAtDash() != -1 && cmd.ArgsLenAtDash() != 1) {
				return errors.New("usage: isthmus lab kubectl CLUSTER -- [KUBECTL ARG...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := readLabState()
			if err != nil {
				return err
			}
			if st.Kubernetes == nil {
				return fmt.Errorf("lab %s has no Kubernetes clusters ('isthmus lab up --kubernetes' builds them)", st.Prefix)
			}
			var names []string
			for _, cl := range st.Clusters {
				names = append(names, cl.Name)
				if cl.Name != args[0] {
					continue
				}
				nsenter, err := exec.LookPath("nsenter")
				if err != nil {
					return err
				}
				argv := append([]string{"nsenter", "--net=" + lab.NetnsPath(cl.Router), "--", st.Kubernetes.Kubectl, "--kubeconfig", cl.Kubeconfig}, args[1:]...)
				return syscall.Exec(nsenter, argv, append(os.Environ(), lab.EnvPrefix+"="+st.Prefix))
			}
			return fmt.Errorf("lab %s has no cluster %q (clusters: %s)", st.Prefix, args[0], strings.Join(names, ", "))
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
