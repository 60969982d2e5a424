package translate

import (
	"fmt"
	"maps"
	"slices"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// MaxPortRange is the largest endPort range (in ports) NetworkPolicy
// expands into single-port entries.
const MaxPortRange = 256

// NetworkPolicy translates a Kubernetes NetworkPolicy into an Isthmus
// NetworkPolicy with the same meaning; see the package documentation.
// peersCluster, when not empty, limits every pod and namespace peer to the
// pods of that cluster (the policy's own: a NetworkPolicy is written for
// one cluster and should not admit whatever another cluster labels the
// same); "" lets them match every cluster of the mesh.
// What the Isthmus engine cannot express (named ports, SCTP, ipBlock, an
// endPort range over MaxPortRange ports) is an error naming the field,
// "unsupported: ...": the caller reports it and skips the policy.
func NetworkPolicy(np *networkingv1.NetworkPolicy, peersCluster string) (objects.NetworkPolicy, error) {
	if np == nil {
		return objects.NetworkPolicy{}, fmt.Errorf("networkpolicy: nil")
	}
	out, err := networkPolicy(np, peersCluster)
	if err != nil {
		return objects.NetworkPolicy{}, fmt.Errorf("networkpolicy %s/%s: %w", np.Namespace, np.Name, err)
	}
	return out, nil
}

func networkPolicy(np *networkingv1.NetworkPolicy, peersCluster string) (objects.NetworkPolicy, error) {
	out := objects.NetworkPolicy{
		APIVersion: objects.APIVersion,
		Kind:       objects.KindNetworkPolicy,
		Metadata:   objects.Meta{Name: np.Name, Namespace: np.Namespace},
	}
	sel, err := podSelector("spec.podSelector", &np.Spec.PodSelector)
	if err != nil {
		return out, err
	}
	out.Spec.EndpointSelector = sel

	types := np.Spec.PolicyTypes
	if len(types) == 0 {
		types = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		if len(np.Spec.Egress) > 0 {
			types = append(types, networkingv1.PolicyTypeEgress)
		}
	}
	ingress, egress := false, false
	for i, t := range types {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		default:
			return out, fmt.Errorf("spec.policyTypes[%d]: must be Ingress or Egress, got %q", i, t)
		}
	}
	if ingress {
		out.Spec.PolicyTypes = append(out.Spec.PolicyTypes, objects.PolicyTypeIngress)
		for i, r := range np.Spec.Ingress {
			path := fmt.Sprintf("spec.ingress[%d]", i)
			peers, err := peers(path+".from", r.From, peersCluster)
			if err != nil {
				return out, err
			}
			ports, err := ports(path+".ports", r.Ports)
			if err != nil {
				return out, err
			}
			out.Spec.Ingress = append(out.Spec.Ingress, objects.IngressRule{FromEndpoints: peers, ToPorts: ports})
		}
	}
	if egress {
		out.Spec.PolicyTypes = append(out.Spec.PolicyTypes, objects.PolicyTypeEgress)
		for i, r := range np.Spec.Egress {
			path := fmt.Sprintf("spec.egress[%d]", i)
			peers, err := peers(path+".to", r.To, peersCluster)
			if err != nil {
				return out, err
			}
			ports, err := ports(path+".ports", r.Ports)
			if err != nil {
				return out, err
			}
			out.Spec.Egress = append(out.Spec.Egress, objects.EgressRule{ToEndpoints: peers, ToPorts: ports})
		}
	}
	if err := out.Validate(); err != nil {
		return out, fmt.Errorf("translated policy is invalid: %w", err)
	}
	return out, nil
}

// peers translates the peers of one rule. No peers: nil, which the Isthmus
// rule reads as any peer. cluster, when not empty, is required of every
// peer (isthmus.io/cluster).
func peers(path string, in []networkingv1.NetworkPolicyPeer, cluster string) ([]objects.Selector, error) {
	var out []objects.Selector
	for i, p := range in {
		ppath := fmt.Sprintf("%s[%d]", path, i)
		switch {
		case p.IPBlock != nil:
			return nil, fmt.Errorf("%s.ipBlock: unsupported: ipBlock peers", ppath)
		case p.PodSelector == nil && p.NamespaceSelector == nil:
			return nil, fmt.Errorf("%s: must have a podSelector, a namespaceSelector or an ipBlock", ppath)
		}
		var sel objects.Selector
		if p.PodSelector != nil {
			s, err := podSelector(ppath+".podSelector", p.PodSelector)
			if err != nil {
				return nil, err
			}
			sel = s
		}
		// Without a namespaceSelector the selector names no namespace
		// and so stays in the policy's namespace.
		if p.NamespaceSelector != nil {
			ns, err := namespaceSelector(ppath+".namespaceSelector", p.NamespaceSelector)
			if err != nil {
				return nil, err
			}
			if len(ns.MatchLabels) > 0 && sel.MatchLabels == nil {
				sel.MatchLabels = map[string]string{}
			}
			maps.Copy(sel.MatchLabels, ns.MatchLabels)
			sel.MatchExpressions = append(sel.MatchExpressions, ns.MatchExpressions...)
			sel.MatchExpressions = append(sel.MatchExpressions, objects.LabelSelectorRequirement{Key: identity.LabelNamespace, Operator: objects.OpExists})
		}
		if cluster != "" {
			// podSelector and namespaceSelector keys are never isthmus.io
			// ones (refused or mapped below), so this adds, never replaces.
			if sel.MatchLabels == nil {
				sel.MatchLabels = map[string]string{}
			}
			sel.MatchLabels[identity.LabelCluster] = cluster
		}
		out = append(out, sel)
	}
	return out, nil
}

// podSelector translates a selector of pod labels. Keys of the reserved
// isthmus.io prefixes are not pod labels in identities (PodLabels drops
// them) and could lift the namespace limit: an error.
func podSelector(path string, ls *metav1.LabelSelector) (objects.Selector, error) {
	return selector(path, ls, func(k string) (string, error) {
		if reservedKey(k) {
			return "", fmt.Errorf("unsupported: label key %q: the isthmus.io prefix is reserved", k)
		}
		return k, nil
	})
}

// namespaceSelector translates a selector of namespace labels into one of
// the identity labels that carry them (NamespaceLabelKey).
func namespaceSelector(path string, ls *metav1.LabelSelector) (objects.Selector, error) {
	return selector(path, ls, func(k string) (string, error) {
		mk := NamespaceLabelKey(k)
		if mk == "" {
			return "", fmt.Errorf("unsupported: namespace label key %q cannot be carried in identities (the prefix under %s would exceed 253 characters)", k, NamespaceLabelDomain)
		}
		return mk, nil
	})
}

func selector(path string, ls *metav1.LabelSelector, mapKey func(string) (string, error)) (objects.Selector, error) {
	var out objects.Selector
	for _, k := range slices.Sorted(maps.Keys(ls.MatchLabels)) {
		mk, err := mapKey(k)
		if err != nil {
			return out, fmt.Errorf("%s.matchLabels: %w", path, err)
		}
		if out.MatchLabels == nil {
			out.MatchLabels = map[string]string{}
		}
		out.MatchLabels[mk] = ls.MatchLabels[k]
	}
	for i, r := range ls.MatchExpressions {
		rpath := fmt.Sprintf("%s.matchExpressions[%d]", path, i)
		mk, err := mapKey(r.Key)
		if err != nil {
			return out, fmt.Errorf("%s.key: %w", rpath, err)
		}
		switch r.Operator {
		case metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn, metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist:
		default:
			return out, fmt.Errorf("%s.operator: unsupported: %q", rpath, r.Operator)
		}
		out.MatchExpressions = append(out.MatchExpressions, objects.LabelSelectorRequirement{
			Key: mk, Operator: string(r.Operator), Values: slices.Clone(r.Values),
		})
	}
	return out, nil
}

// ports translates the ports of one rule. No ports: nil, any port and
// protocol.
func ports(path string, in []networkingv1.NetworkPolicyPort) ([]objects.PortRule, error) {
	var out []objects.PortRule
	for i, p := range in {
		ppath := fmt.Sprintf("%s[%d]", path, i)
		proto := objects.ProtocolTCP
		if p.Protocol != nil {
			switch *p.Protocol {
			case corev1.ProtocolTCP:
			case corev1.ProtocolUDP:
				proto = objects.ProtocolUDP
			case corev1.ProtocolSCTP:
				return nil, fmt.Errorf("%s.protocol: unsupported: SCTP", ppath)
			default:
				return nil, fmt.Errorf("%s.protocol: unsupported: %q", ppath, *p.Protocol)
			}
		}
		if p.Port == nil {
			if p.EndPort != nil {
				return nil, fmt.Errorf("%s.endPort: needs a port", ppath)
			}
			out = append(out, objects.PortRule{Protocol: proto}) // every port of proto
			continue
		}
		if p.Port.Type == intstr.String {
			return nil, fmt.Errorf("%s.port: unsupported: named port %q", ppath, p.Port.StrVal)
		}
		port := p.Port.IntVal
		if port < 1 || port > 65535 {
			return nil, fmt.Errorf("%s.port: must be 1-65535, got %d", ppath, port)
		}
		end := port
		if p.EndPort != nil {
			end = *p.EndPort
			switch {
			case end < port || end > 65535:
				return nil, fmt.Errorf("%s.endPort: must be %d-65535 (at least port), got %d", ppath, port, end)
			case end-port+1 > MaxPortRange:
				return nil, fmt.Errorf("%s.endPort: unsupported: a range of %d ports (%d-%d); at most %d", ppath, end-port+1, port, end, MaxPortRange)
			}
		}
		for n := port; n <= end; n++ {
			out = append(out, objects.PortRule{Port: uint16(n), Protocol: proto})
		}
	}
	return out, nil
}
