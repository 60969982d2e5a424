package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// kindNames maps what users type to the API kind.
var kindNames = map[string]string{
	"service": objects.KindService, "services": objects.KindService, "svc": objects.KindService,
	"policy": objects.KindNetworkPolicy, "policies": objects.KindNetworkPolicy,
	"networkpolicy": objects.KindNetworkPolicy, "networkpolicies": objects.KindNetworkPolicy, "netpol": objects.KindNetworkPolicy,
	"pool": objects.KindLoadBalancerIPPool, "pools": objects.KindLoadBalancerIPPool,
	"ippool": objects.KindLoadBalancerIPPool, "ippools": objects.KindLoadBalancerIPPool,
	"loadbalancerippool": objects.KindLoadBalancerIPPool, "loadbalancerippools": objects.KindLoadBalancerIPPool,
	"bgppeeringpolicy": objects.KindBGPPeeringPolicy, "bgppeeringpolicies": objects.KindBGPPeeringPolicy, "bgpp": objects.KindBGPPeeringPolicy,
	"l2announcementpolicy": objects.KindL2AnnouncementPolicy, "l2announcementpolicies": objects.KindL2AnnouncementPolicy,
	"l2policy": objects.KindL2AnnouncementPolicy, "l2policies": objects.KindL2AnnouncementPolicy,
}

func parseKind(s string) (string, error) {
	if k, ok := kindNames[strings.ToLower(s)]; ok {
		return k, nil
	}
	// Endpoints and identities are not applied objects, but users coming
	// from kubectl try them here: name the verbs that do handle them.
	switch strings.ToLower(s) {
	case "endpoint", "endpoints", "ep", "pod", "pods":
		return "", fmt.Errorf("unknown kind %q: endpoints have their own verbs: isthmus endpoint list|add|del", s)
	case "identity", "identities", "id":
		return "", fmt.Errorf("unknown kind %q: identities are listed with isthmus identity list", s)
	}
	return "", fmt.Errorf("unknown kind %q: want service (services, svc), policy (policies, networkpolicy, networkpolicies, netpol), pool (pools, ippool, ippools, loadbalancerippool, loadbalancerippools), bgppeeringpolicy (bgppeeringpolicies, bgpp) or l2policy (l2policies, l2announcementpolicy, l2announcementpolicies)", s)
}

// kindCompletions are what `get` and `delete` offer for KIND.
var kindCompletions = []cobra.Completion{
	cobra.CompletionWithDesc("services", "Service objects"),
	cobra.CompletionWithDesc("policies", "NetworkPolicy objects"),
	cobra.CompletionWithDesc("pools", "LoadBalancerIPPool objects"),
	cobra.CompletionWithDesc("l2policies", "L2AnnouncementPolicy objects"),
}

// completeObjects completes KIND, then NAME from the agent's objects of
// that kind in the -n namespace ("default" when not given, as for NAME).
func (c *cli) completeObjects(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	switch len(args) {
	case 0:
		return filterPrefix(kindCompletions, toComplete), cobra.ShellCompDirectiveNoFileComp
	case 1:
	default:
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	kind, err := parseKind(args[0])
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ns, _ := cmd.Flags().GetString("namespace")
	if ns == "" {
		ns = objects.DefaultNamespace
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	objs, err := c.client().ListObjects(ctx, kind)
	if err != nil {
		cobra.CompDebugln(err.Error(), false)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []cobra.Completion
	for _, o := range objs {
		if o.Namespace == ns {
			names = append(names, o.Name)
		}
	}
	return filterPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

func (c *cli) applyCommand() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "apply -f FILE|-",
		Short: "Create or update Services, NetworkPolicies and LoadBalancerIPPools from YAML (all or nothing)",
		Long: `Apply the YAML documents in FILE (or standard input with -f -). Every
document must be a valid Service, NetworkPolicy or LoadBalancerIPPool of
apiVersion isthmus.io/v1alpha1; if one is not, a Service claims another's
VIP and port, or a pool shares addresses with another, nothing is applied. The command returns once this node's datapath
enforces the new state. In cluster mode the objects are stored cluster-wide
and every node applies them as it sees them; the command waits for this node
(at most 30 s, then it returns and the agent logs a warning).`,
		Example: `  isthmus apply -f web.yaml
  cat policy.yaml | isthmus apply -f -`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return fmt.Errorf("apply needs -f FILE (or -f - for standard input)")
			}
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(io.LimitReader(c.in, api.MaxBodyBytes+1))
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return fmt.Errorf("read %s: %w", file, err)
			}
			if len(data) > api.MaxBodyBytes {
				return fmt.Errorf("%s is larger than %d bytes: split it into several applies", file, api.MaxBodyBytes)
			}
			ctx, cancel := c.ctx(cmd)
			defer cancel()
			res, err := c.client().Apply(ctx, data)
			if err != nil {
				return err
			}
			for _, o := range res.Objects {
				fmt.Fprintf(c.out, "%s %s/%s %s\n", o.Kind, o.Namespace, o.Name, o.Action)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "file with YAML documents, - for standard input")
	_ = cmd.MarkFlagFilename("filename", "yaml", "yml")
	return cmd
}

func (c *cli) getCommand() *cobra.Command {
	var format, ns string
	cmd := &cobra.Command{
		Use:   "get services|policies|pools [NAME]",
		Short: "Show applied Services, NetworkPolicies or LoadBalancerIPPools",
		Long: `Show applied objects. KIND is services (service, svc), policies (policy,
networkpolicy, networkpolicies, netpol) or pools (pool, ippool, ippools,
loadbalancerippool, loadbalancerippools), in any case. A Service of type
LoadBalancer shows the addresses LB-IPAM assigned (EXTERNAL-IP; -o yaml
shows status.loadBalancer, with the reason when it was refused); a pool
shows its addresses used and total. Pools are cluster-scoped (namespace
"default"). Without NAME every
object of the kind is listed, in the namespace given with -n or in all
namespaces; with NAME, -n defaults to "default". In cluster mode the objects
are those stored in the cluster's etcd.

-o yaml prints documents that isthmus apply takes back (separated by ---);
-o json prints the object for KIND NAME, a list otherwise.`,
		Example: `  isthmus get services
  isthmus get svc -n shop -o json
  isthmus get service web -o yaml
  isthmus get pools
  isthmus get policy allow-client -o yaml > allow-client.yaml`,
		Args:              withUsage(cobra.RangeArgs(1, 2)),
		ValidArgsFunction: c.completeObjects,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkFormat(format); err != nil {
				return err
			}
			kind, err := parseKind(args[0])
			if err != nil {
				return err
			}
			ctx, cancel := c.ctx(cmd)
			defer cancel()
			objs, err := c.client().ListObjects(ctx, kind)
			if err != nil {
				return err
			}
			nsSet := cmd.Flags().Changed("namespace")
			if len(args) == 2 && !nsSet {
				ns = objects.DefaultNamespace
			}
			objs = slices.DeleteFunc(objs, func(o api.Object) bool {
				return (ns != "" && o.Namespace != ns) || (len(args) == 2 && o.Name != args[1])
			})
			if len(args) == 2 && len(objs) == 0 {
				return fmt.Errorf("%s %s/%s not found", kind, ns, args[1])
			}
			return c.printObjects(kind, format, objs, len(args) == 2)
		},
	}
	addOutputFlag(cmd, &format)
	cmd.Flags().StringVarP(&ns, "namespace", "n", "", "only this namespace (default: all; \"default\" when NAME is given)")
	return cmd
}

func (c *cli) printObjects(kind, format string, objs []api.Object, single bool) error {
	switch format {
	case formatJSON:
		if single {
			return printData(c.out, format, objs[0].Object)
		}
		docs := make([]json.RawMessage, len(objs))
		for i, o := range objs {
			docs[i] = o.Object
		}
		return printData(c.out, format, docs)
	case formatYAML:
		for i, o := range objs {
			y, err := yaml.JSONToYAML(o.Object)
			if err != nil {
				return err
			}
			if i > 0 {
				fmt.Fprintln(c.out, "---")
			}
			if _, err := c.out.Write(y); err != nil {
				return err
			}
		}
		return nil
	}
	if len(objs) == 0 {
		fmt.Fprintf(c.out, "No %s applied. Apply some with: isthmus apply -f FILE\n", plural(kind))
		return nil
	}
	t := newTable(c.out)
	switch kind {
	case objects.KindService:
		fmt.Fprintln(t, "NAMESPACE\tNAME\tVIPS\tPORTS\tSELECTOR\tBACKENDS\tEXTERNAL-IP")
	case objects.KindLoadBalancerIPPool:
		fmt.Fprintln(t, "NAME\tBLOCKS\tSERVICE SELECTOR\tDISABLED\tUSED\tTOTAL")
	case objects.KindBGPPeeringPolicy:
		fmt.Fprintln(t, "NAME\tNODES\tLOCAL AS\tNEIGHBORS\tADVERTISEMENTS")
	case objects.KindL2AnnouncementPolicy:
		fmt.Fprintln(t, "NAMESPACE\tNAME\tSERVICES\tNODES\tINTERFACES\tLB IPS\tEXTERNAL IPS")
	default:
		fmt.Fprintln(t, "NAMESPACE\tNAME\tENDPOINTS\tINGRESS RULES\tEGRESS RULES")
	}
	for _, o := range objs {
		decoded, err := objects.Decode(o.Object)
		if err != nil || len(decoded) != 1 {
			return fmt.Errorf("the agent returned %s %s/%s in a form this CLI does not understand (version mismatch?): %v", o.Kind, o.Namespace, o.Name, err)
		}
		// Decode drops the status (Isthmus's, not the user's): read it apart.
		var status struct {
			Status struct {
				objects.ServiceStatus
				objects.LoadBalancerIPPoolStatus
			} `json:"status"`
		}
		_ = json.Unmarshal(o.Object, &status)
		switch v := decoded[0].(type) {
		case *objects.LoadBalancerIPPool:
			var blocks []string
			for _, r := range v.Ranges() {
				blocks = append(blocks, r.String())
			}
			sel := identity.Labels(v.Spec.ServiceSelector.MatchLabels).String()
			if sel == "" && len(v.Spec.ServiceSelector.MatchExpressions) == 0 {
				sel = "<all>"
			} else if len(v.Spec.ServiceSelector.MatchExpressions) > 0 {
				sel = strings.TrimPrefix(sel+",<expressions>", ",")
			}
			st := status.Status.LoadBalancerIPPoolStatus
			used := strconv.Itoa(st.Used)
			if len(st.Kept) > 0 {
				used += fmt.Sprintf(" (%d kept outside)", len(st.Kept))
			}
			fmt.Fprintf(t, "%s\t%s\t%s\t%t\t%s\t%s\n", o.Name, strings.Join(blocks, ","), sel, v.Spec.Disabled, used, orNone(st.Total))
			continue
		}
		switch v := decoded[0].(type) {
		case *objects.Service:
			var ports, backends []string
			for _, p := range v.Spec.Ports {
				s := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
				if p.Target() != p.Port {
					s = fmt.Sprintf("%d->%d/%s", p.Port, p.Target(), p.Protocol)
				}
				ports = append(ports, s)
			}
			for _, b := range v.Spec.Backends {
				backends = append(backends, b.IP)
			}
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", o.Namespace, o.Name, strings.Join(v.Spec.VIPs, ","), strings.Join(ports, ","),
				orNone(identity.Labels(v.Spec.Selector).String()), orNone(strings.Join(backends, ",")),
				externalIPs(*v, status.Status.LoadBalancer))
		case *objects.NetworkPolicy:
			sel := identity.Labels(v.Spec.EndpointSelector.MatchLabels).String()
			if sel == "" {
				sel = "<all>"
			}
			fmt.Fprintf(t, "%s\t%s\t%s\t%d\t%d\n", o.Namespace, o.Name, sel, len(v.Spec.Ingress), len(v.Spec.Egress))
		case *objects.BGPPeeringPolicy:
			sel := identity.Labels(v.Spec.NodeSelector.MatchLabels).String()
			if sel == "" && len(v.Spec.NodeSelector.MatchExpressions) == 0 {
				sel = "<all>"
			}
			var ns, ads []string
			for _, n := range v.Spec.Neighbors {
				ns = append(ns, fmt.Sprintf("%s (AS %d)", n.Address, n.PeerASN))
			}
			for _, a := range v.Spec.Advertisements {
				ads = append(ads, a.Type)
			}
			fmt.Fprintf(t, "%s\t%s\t%d\t%s\t%s\n", o.Name, sel, v.Spec.LocalASN, strings.Join(ns, ", "), orNone(strings.Join(ads, ",")))
		case *objects.L2AnnouncementPolicy:
			ifaces := strings.Join(v.Spec.Interfaces, ",")
			if v.Spec.InterfaceRegex != "" {
				ifaces = "/" + v.Spec.InterfaceRegex + "/"
			}
			all := func(s objects.Selector) string {
				if l := identity.Labels(s.MatchLabels).String(); l != "" || len(s.MatchExpressions) > 0 {
					return orNone(l) + strings.Repeat("+expr", min(len(s.MatchExpressions), 1))
				}
				return "<all>"
			}
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%v\t%v\n", o.Namespace, o.Name, all(v.Spec.ServiceSelector), all(v.Spec.NodeSelector),
				ifaces, v.Spec.CoversLoadBalancerIPs(), v.Spec.CoversExternalIPs())
		}
	}
	return t.Flush()
}

func plural(kind string) string {
	switch kind {
	case objects.KindService:
		return "services"
	case objects.KindLoadBalancerIPPool:
		return "pools"
	case objects.KindBGPPeeringPolicy:
		return "BGP peering policies"
	case objects.KindL2AnnouncementPolicy:
		return "l2policies"
	}
	return "policies"
}

// externalIPs is the EXTERNAL-IP column of a service: its external IPs and
// the load-balancer addresses LB-IPAM assigned, <pending> for a
// LoadBalancer service without any yet, <refused> when LB-IPAM refused it
// (-o yaml shows why).
func externalIPs(s objects.Service, lb objects.LoadBalancerStatus) string {
	ips := slices.Clone(s.Spec.ExternalIPs)
	for _, in := range lb.Ingress {
		ips = append(ips, in.IP)
	}
	switch {
	case lb.Refused != "":
		ips = append(ips, "<refused>")
	case s.Spec.IsLoadBalancer() && len(lb.Ingress) == 0:
		ips = append(ips, "<pending>")
	}
	return orNone(strings.Join(ips, ","))
}

func (c *cli) deleteCommand() *cobra.Command {
	var ns string
	cmd := &cobra.Command{
		Use:     "delete service|policy|pool NAME [--namespace NS]",
		Aliases: []string{"del", "rm"},
		Short:   "Delete an applied Service, NetworkPolicy or LoadBalancerIPPool",
		Long: `Delete an applied object; the command returns once this node's datapath has
dropped it. KIND is as for get. In cluster mode the object is deleted from
the cluster's etcd and every node of the cluster drops it (the command waits
for this node, at most 30 s). Endpoints are removed with isthmus endpoint del.`,
		Example: `  isthmus delete service web
  isthmus del netpol allow-client -n shop`,
		Args:              withUsage(cobra.ExactArgs(2)),
		ValidArgsFunction: c.completeObjects,
		RunE: func(cmd *cobra.Command, args []string) error {
			kind, err := parseKind(args[0])
			if err != nil {
				return err
			}
			ctx, cancel := c.ctx(cmd)
			defer cancel()
			if err := c.client().DeleteObject(ctx, kind, ns, args[1]); err != nil {
				if api.IsNotFound(err) {
					return fmt.Errorf("%w (isthmus get %s lists them)", err, plural(kind))
				}
				return err
			}
			fmt.Fprintf(c.out, "%s %s/%s deleted\n", kind, ns, args[1])
			return nil
		},
	}
	cmd.Flags().StringVarP(&ns, "namespace", "n", objects.DefaultNamespace, "namespace of the object")
	return cmd
}
