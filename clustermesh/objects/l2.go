package objects

import (
	"fmt"
	"regexp"
	"strings"
)

// KindL2AnnouncementPolicy names the L2 announcement policy kind.
const KindL2AnnouncementPolicy = "L2AnnouncementPolicy"

// ServiceNamespaceLabel is the label a policy's serviceSelector can use to
// pick services by namespace: every service carries it implicitly, with
// its namespace as the value (as endpoints carry it in their identity).
const ServiceNamespaceLabel = "isthmus.io/namespace"

// L2AnnouncementPolicy says which service addresses are answered with ARP
// (IPv4) and NDP (IPv6) on which interfaces of which nodes. One node at a
// time answers a given address (see gateway/l2 and agent/l2). The policy
// is cluster-wide: its namespace only files it, and serviceSelector looks
// at services of every namespace (use the ServiceNamespaceLabel key to
// restrict it).
type L2AnnouncementPolicy struct {
	APIVersion string                   `json:"apiVersion"`
	Kind       string                   `json:"kind"`
	Metadata   Meta                     `json:"metadata"`
	Spec       L2AnnouncementPolicySpec `json:"spec"`
}

// L2AnnouncementPolicySpec is what a policy selects.
type L2AnnouncementPolicySpec struct {
	// ServiceSelector picks services by their metadata.labels (plus
	// ServiceNamespaceLabel); empty: every service.
	ServiceSelector Selector `json:"serviceSelector,omitzero"`
	// NodeSelector picks the nodes that may answer, by the labels the
	// agent is given (--node-labels); empty: every node.
	NodeSelector Selector `json:"nodeSelector,omitzero"`
	// Interfaces are the exact names of the interfaces to answer on;
	// InterfaceRegex is an RE2 expression matched against the whole name.
	// Exactly one of the two is given.
	Interfaces     []string `json:"interfaces,omitempty"`
	InterfaceRegex string   `json:"interfaceRegex,omitempty"`
	// LoadBalancerIPs and ExternalIPs say which of a service's addresses
	// are announced: those LB-IPAM assigned (status.loadBalancer.ingress)
	// and spec.externalIPs. Both default to true.
	LoadBalancerIPs *bool `json:"loadBalancerIPs,omitempty"`
	ExternalIPs     *bool `json:"externalIPs,omitempty"`
}

// GetKind implements Object.
func (p L2AnnouncementPolicy) GetKind() string { return KindL2AnnouncementPolicy }

// GetMeta implements Object.
func (p L2AnnouncementPolicy) GetMeta() Meta { return p.Metadata }

func (p *L2AnnouncementPolicy) defaultNamespace() {
	p.Metadata.Namespace = namespaceOrDefault(p.Metadata.Namespace)
}

// normalize writes the defaults out, so a stored policy says what it does.
func (p *L2AnnouncementPolicy) normalize() {
	t := true
	if p.Spec.LoadBalancerIPs == nil {
		p.Spec.LoadBalancerIPs = &t
	}
	if p.Spec.ExternalIPs == nil {
		p.Spec.ExternalIPs = &t
	}
}

// CoversLoadBalancerIPs reports whether load-balancer addresses are
// announced (default true).
func (s L2AnnouncementPolicySpec) CoversLoadBalancerIPs() bool {
	return s.LoadBalancerIPs == nil || *s.LoadBalancerIPs
}

// CoversExternalIPs reports whether external IPs are announced (default
// true).
func (s L2AnnouncementPolicySpec) CoversExternalIPs() bool {
	return s.ExternalIPs == nil || *s.ExternalIPs
}

// SelectsService reports whether the policy's serviceSelector matches s.
func (s L2AnnouncementPolicySpec) SelectsService(svc Service) bool {
	l := make(map[string]string, len(svc.Metadata.Labels)+1)
	for k, v := range svc.Metadata.Labels {
		l[k] = v
	}
	l[ServiceNamespaceLabel] = namespaceOrDefault(svc.Metadata.Namespace)
	return s.ServiceSelector.Matches(l)
}

// InterfaceMatcher returns the predicate over interface names the policy
// selects. It fails only on a policy Validate would refuse.
func (s L2AnnouncementPolicySpec) InterfaceMatcher() (func(name string) bool, error) {
	if s.InterfaceRegex != "" {
		re, err := regexp.Compile("^(?:" + s.InterfaceRegex + ")$")
		if err != nil {
			return nil, err
		}
		return re.MatchString, nil
	}
	names := map[string]bool{}
	for _, n := range s.Interfaces {
		names[n] = true
	}
	return func(name string) bool { return names[name] }, nil
}

// maxInterfaceName is IFNAMSIZ minus the terminating NUL.
const maxInterfaceName = 15

// validInterfaceName reports whether s can name a Linux interface.
func validInterfaceName(s string) error {
	switch {
	case s == "" || s == "." || s == "..":
		return fmt.Errorf("%q is not an interface name", s)
	case len(s) > maxInterfaceName:
		return fmt.Errorf("%q is longer than %d characters", s, maxInterfaceName)
	case strings.ContainsAny(s, "/: \t\n\x00"):
		return fmt.Errorf("%q: interface names cannot hold '/', ':' or white space", s)
	}
	return nil
}

// Validate checks a policy as Decode leaves it (namespace set).
func (p L2AnnouncementPolicy) Validate() error {
	if err := validateHeader(p.APIVersion, p.Kind, KindL2AnnouncementPolicy, p.Metadata); err != nil {
		return err
	}
	if err := validateSelector("spec.serviceSelector", p.Spec.ServiceSelector); err != nil {
		return err
	}
	if err := validateSelector("spec.nodeSelector", p.Spec.NodeSelector); err != nil {
		return err
	}
	switch {
	case len(p.Spec.Interfaces) > 0 && p.Spec.InterfaceRegex != "":
		return fieldError("spec", "give interfaces or interfaceRegex, not both")
	case len(p.Spec.Interfaces) == 0 && p.Spec.InterfaceRegex == "":
		return fieldError("spec", "needs interfaces (a list of names) or interfaceRegex")
	}
	seen := map[string]int{}
	for i, n := range p.Spec.Interfaces {
		path := fmt.Sprintf("spec.interfaces[%d]", i)
		if err := validInterfaceName(n); err != nil {
			return fieldError(path, "%v", err)
		}
		if j, dup := seen[n]; dup {
			return fieldError(path, "%q is already listed as spec.interfaces[%d]", n, j)
		}
		seen[n] = i
	}
	if p.Spec.InterfaceRegex != "" {
		if _, err := regexp.Compile("^(?:" + p.Spec.InterfaceRegex + ")$"); err != nil {
			return fieldError("spec.interfaceRegex", "not a valid regular expression: %v", err)
		}
	}
	if !p.Spec.CoversLoadBalancerIPs() && !p.Spec.CoversExternalIPs() {
		return fieldError("spec", "loadBalancerIPs and externalIPs are both false: the policy would announce nothing")
	}
	return nil
}
