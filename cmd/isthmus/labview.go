package main

import (
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
)

// printLabView is the summary of `lab up` and `lab status`.
func printLabView(w io.Writer, v lab.View, state string) error {
	st := v.State
	echo, denied := 0, 0
	for _, p := range st.Pods {
		if p.Role == connectivity.RoleEcho {
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
	if st.PolicyAdmitsOutside {
		fmt.Fprintf(w, "NetworkPolicy %s: app=echo pods admit tcp/%d from app=echo pods (of any cluster) and from outside the mesh (world, and the nodes that SNAT it)\n", st.Policy, connectivity.EchoPort)
	} else {
		fmt.Fprintf(w, "NetworkPolicy %s: app=echo pods admit tcp/%d only from app=echo pods (of any cluster)\n", st.Policy, connectivity.EchoPort)
	}
	for _, v := range st.VMs {
		fmt.Fprintf(w, "External workload %s (%s, joined %s, label app=vm, admitted by the policy): %s, echo server on port %d\n", v.Name, v.Workload, v.Cluster, joinAddrs(v.IPs), connectivity.EchoPort)
	}
	for _, o := range st.Outside {
		var addrs []string
		for _, a := range o.Addrs {
			addrs = append(addrs, a.String())
		}
		fmt.Fprintf(w, "Outside %s (%s, via %s): the service of %s at %s\n", o.Name, joinAddrs(o.IPs), o.Via, o.Cluster, strings.Join(addrs, ", "))
	}

	if len(v.Problems) > 0 {
		fmt.Fprintln(w, "\nNot ready:")
		for _, p := range v.Problems {
			fmt.Fprintf(w, "  %s\n", p)
		}
	}
	if v.Connectivity != nil {
		fmt.Fprintln(w, "\nConnectivity test:")
		if err := v.Connectivity.WriteTable(w, false); err != nil {
			return err
		}
	}

	if len(st.Pods) > 0 && len(st.Clusters) > 0 {
		first, sock := st.Pods[0], st.Clusters[0].Nodes[0].Socket
		var remote lab.StatePod
		for _, p := range st.Pods {
			if p.Role == connectivity.RoleEcho && p.Cluster != first.Cluster {
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
  isthmus lab status%[8]s%[9]s
  isthmus lab down
`, first.Name, vip, remote.IPv4, connectivity.EchoPort, st.Clusters[0].Name, st.Clusters[0].Nodes[0].Name, sock, outsideHints(st), kubeHints(st))
	}
	return nil
}

// kubeHints are the explore lines of a Kubernetes lab (--kubernetes).
func kubeHints(st *lab.State) string {
	k := st.Kubernetes
	if k == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n  # Kubernetes %s: Isthmus is the Helm release %s/%s (chart %s)", k.Version, k.Namespace, k.Release, k.Chart)
	for _, c := range st.Clusters {
		fmt.Fprintf(&b, "\n  #   %s: API server %s, admin kubeconfig %s (reachable from the lab's namespaces, e.g. isthmus lab exec %s-rtr -- %s --kubeconfig %s get nodes)",
			c.Name, c.APIServer, c.Kubeconfig, c.Name, k.Kubectl, c.Kubeconfig)
	}
	c := st.Clusters[0]
	fmt.Fprintf(&b, `
  isthmus lab kubectl %[1]s -- get pods -A -o wide
  isthmus lab kubectl %[1]s -- -n %[2]s logs ds/%[3]s-agent
  isthmus lab kubectl %[1]s -- get networkpolicies,services -n default`, c.Name, k.Namespace, k.Release)
	if len(st.Clusters) > 1 {
		fmt.Fprintf(&b, "\n  isthmus lab exec fabric -- %s clustermesh connect --kubeconfig %s --remote-kubeconfig %s   # again: renews the credentials",
			st.Binaries.CLI, c.Kubeconfig, st.Clusters[1].Kubeconfig)
	}
	return b.String()
}

// outsideHints are the explore lines of the outside hosts (--bgp).
func outsideHints(st *lab.State) string {
	if len(st.Outside) == 0 || len(st.Outside[0].Addrs) == 0 {
		return ""
	}
	o := st.Outside[0]
	a := o.Addrs[0]
	return fmt.Sprintf(`
  # from outside the mesh through the load-balancer address; the routes BGP gave the top-of-rack router
  isthmus lab exec %s -- curl -s http://%s/
  isthmus lab exec %s-rtr -- ip route show proto bird
  isthmus --socket %s bgp peers`, o.Name, a, o.Cluster, st.Clusters[0].Nodes[0].Socket)
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
