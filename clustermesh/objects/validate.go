package objects

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// fieldError formats "<path>: <message>".
func fieldError(path, format string, args ...any) error {
	return fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...))
}

func validateDNSLabel(path, s string) error {
	switch {
	case s == "":
		return fieldError(path, "must not be empty")
	case len(s) > 63:
		return fieldError(path, "must be at most 63 characters, got %q", s)
	case !identity.IsDNSLabel(s):
		return fieldError(path, "must be a DNS-1123 label (lower-case alphanumerics and '-', starting and ending alphanumeric), got %q", s)
	}
	return nil
}

// validateLabelMap checks keys and values of a label map or selector, in key
// order so the first error is stable.
func validateLabelMap(path string, m map[string]string) error {
	valid := true
	for k, v := range m {
		valid = valid && identity.ValidateLabelKey(k) == nil && identity.ValidateLabelValue(v) == nil
	}
	if valid {
		return nil // the keys are sorted for the error only
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		if err := identity.ValidateLabelKey(k); err != nil {
			return fieldError(path, "%v", err)
		}
		if err := identity.ValidateLabelValue(m[k]); err != nil {
			return fieldError(fmt.Sprintf("%s[%q]", path, k), "%v", err)
		}
	}
	return nil
}

func validateHeader(apiVersion, kind, wantKind string, m Meta) error {
	if apiVersion != APIVersion {
		return fieldError("apiVersion", "must be %q, got %q", APIVersion, apiVersion)
	}
	if kind != wantKind {
		return fieldError("kind", "must be %q, got %q", wantKind, kind)
	}
	if err := validateDNSLabel("metadata.name", m.Name); err != nil {
		return err
	}
	if err := validateDNSLabel("metadata.namespace", m.Namespace); err != nil {
		return err
	}
	if err := validateLabelMap("metadata.labels", m.Labels); err != nil {
		return err
	}
	// Annotation values are free-form; keys follow the label key rules.
	valid := true
	for k := range m.Annotations {
		valid = valid && identity.ValidateLabelKey(k) == nil
	}
	if valid {
		return nil
	}
	for _, k := range slices.Sorted(maps.Keys(m.Annotations)) {
		if err := identity.ValidateLabelKey(k); err != nil {
			return fieldError("metadata.annotations", "%v", err)
		}
	}
	return nil
}

// parseUnicast parses an address usable as a VIP or backend: no zone, no
// IPv4-mapped IPv6 form, not unspecified, multicast or loopback.
func parseUnicast(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, fmt.Errorf("invalid IP address %q", s)
	case a.Zone() != "":
		return netip.Addr{}, fmt.Errorf("%q: IPv6 zones are not allowed", s)
	case a.Is4In6():
		return netip.Addr{}, fmt.Errorf("%q: use the plain IPv4 form %s", s, a.Unmap())
	case a.IsUnspecified():
		return netip.Addr{}, fmt.Errorf("%q: unspecified address", s)
	case a.IsMulticast():
		return netip.Addr{}, fmt.Errorf("%q: multicast address", s)
	case a.IsLoopback():
		return netip.Addr{}, fmt.Errorf("%q: loopback address", s)
	}
	return a, nil
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// Validate checks a Service as Decode leaves it (namespace set). Protocol
// names are accepted in any case.
func (s Service) Validate() error {
	if err := validateHeader(s.APIVersion, s.Kind, KindService, s.Metadata); err != nil {
		return err
	}
	if len(s.Spec.VIPs) == 0 {
		return fieldError("spec.vips", "must list at least one address")
	}
	// Paths are formatted on errors only: every decoded object is
	// validated, ten thousand in a bulk apply.
	seenFamily := map[string]string{}
	for i, v := range s.Spec.VIPs {
		a, err := parseUnicast(v)
		if err != nil {
			return fieldError(fmt.Sprintf("spec.vips[%d]", i), "%v", err)
		}
		if prev, dup := seenFamily[family(a)]; dup {
			return fieldError(fmt.Sprintf("spec.vips[%d]", i), "at most one %s address allowed, already have %q", family(a), prev)
		}
		seenFamily[family(a)] = v
	}

	if len(s.Spec.Ports) == 0 {
		return fieldError("spec.ports", "must list at least one port")
	}
	type portKey struct {
		port  uint16
		proto string
	}
	seenPort := map[portKey]int{}
	seenName := map[string]int{}
	for i, p := range s.Spec.Ports {
		path := "spec.ports[" + strconv.Itoa(i) + "]"
		if p.Name != "" {
			if err := validateDNSLabel(path+".name", p.Name); err != nil {
				return err
			}
			if j, dup := seenName[p.Name]; dup {
				return fieldError(path+".name", "%q is already used by spec.ports[%d]", p.Name, j)
			}
			seenName[p.Name] = i
		}
		if p.Port == 0 {
			return fieldError(path+".port", "must be 1-65535, got 0")
		}
		proto, err := serviceProtocol(p.Protocol)
		if err != nil {
			return fieldError(path+".protocol", "%v", err)
		}
		key := portKey{p.Port, proto}
		if j, dup := seenPort[key]; dup {
			return fieldError(path, "port %d/%s is already listed as spec.ports[%d]", p.Port, proto, j)
		}
		seenPort[key] = i
	}

	if err := validateLabelMap("spec.selector", s.Spec.Selector); err != nil {
		return err
	}
	for i, b := range s.Spec.Backends {
		if _, err := parseUnicast(b.IP); err != nil {
			return fieldError(fmt.Sprintf("spec.backends[%d].ip", i), "%v", err)
		}
	}
	// Neither selector nor backends is valid: the frontends exist without
	// backends (a Kubernetes Service without ready endpoints).
	return s.validateExternal()
}

// validateExternal checks type, loadBalancerIPs, externalIPs and
// externalTrafficPolicy.
func (s Service) validateExternal() error {
	switch s.Spec.Type {
	case "", ServiceTypeClusterIP, ServiceTypeNodePort, ServiceTypeLoadBalancer:
	default:
		return fieldError("spec.type", "must be %s, %s or %s, got %q", ServiceTypeClusterIP, ServiceTypeNodePort, ServiceTypeLoadBalancer, s.Spec.Type)
	}
	if err := s.validateNodePorts(); err != nil {
		return err
	}
	switch s.Spec.ExternalTrafficPolicy {
	case "", TrafficPolicyCluster, TrafficPolicyLocal:
	default:
		return fieldError("spec.externalTrafficPolicy", "must be %s or %s, got %q", TrafficPolicyCluster, TrafficPolicyLocal, s.Spec.ExternalTrafficPolicy)
	}
	if len(s.Spec.LoadBalancerIPs) > 0 && !s.Spec.IsLoadBalancer() {
		return fieldError("spec.loadBalancerIPs", "needs spec.type %s", ServiceTypeLoadBalancer)
	}
	seen := map[netip.Addr]string{}
	vipFamilies := map[string]bool{}
	for _, v := range s.Spec.VIPs {
		if a, err := parseUnicast(v); err == nil {
			seen[a] = "spec.vips"
			vipFamilies[family(a)] = true
		}
	}
	perFamily := map[string]string{}
	check := func(field string, list []string, onePerFamily bool) error {
		for i, v := range list {
			path := field + "[" + strconv.Itoa(i) + "]"
			a, err := parseUnicast(v)
			if err != nil {
				return fieldError(path, "%v", err)
			}
			if where, dup := seen[a]; dup {
				return fieldError(path, "%s is already listed in %s", a, where)
			}
			seen[a] = field
			if onePerFamily {
				if prev, dup := perFamily[family(a)]; dup {
					return fieldError(path, "at most one %s address allowed, already have %q", family(a), prev)
				}
				perFamily[family(a)] = v
			}
		}
		return nil
	}
	if err := check("spec.loadBalancerIPs", s.Spec.LoadBalancerIPs, true); err != nil {
		return err
	}
	// LB-IPAM gives a service one address per family of its VIPs; a
	// requested address of another family could never be honoured.
	for i, v := range s.Spec.LoadBalancerIPs {
		a, _ := parseUnicast(v)
		if _, ok := vipFamilies[family(a)]; !ok {
			return fieldError(fmt.Sprintf("spec.loadBalancerIPs[%d]", i), "%s is %s but spec.vips has no %s address", a, family(a), family(a))
		}
	}
	return check("spec.externalIPs", s.Spec.ExternalIPs, false)
}

// validateNodePorts checks the ports' nodePorts against the type and the
// range, and that no two ports share one (per protocol).
func (s Service) validateNodePorts() error {
	seen := map[string]int{}
	for i, p := range s.Spec.Ports {
		path := "spec.ports[" + strconv.Itoa(i) + "].nodePort"
		switch {
		case p.NodePort == 0 && s.Spec.Type == ServiceTypeNodePort:
			return fieldError(path, "required for spec.type %s (Isthmus does not allocate node ports): pick one in %d-%d", ServiceTypeNodePort, NodePortMin, NodePortMax)
		case p.NodePort == 0:
			continue
		case !s.Spec.HasNodePorts():
			return fieldError(path, "needs spec.type %s or %s", ServiceTypeNodePort, ServiceTypeLoadBalancer)
		case p.NodePort < NodePortMin || p.NodePort > NodePortMax:
			return fieldError(path, "must be in %d-%d, got %d", NodePortMin, NodePortMax, p.NodePort)
		}
		proto, _ := serviceProtocol(p.Protocol) // checked by the caller
		key := fmt.Sprintf("%d/%s", p.NodePort, proto)
		if j, dup := seen[key]; dup {
			return fieldError(path, "node port %s is already used by spec.ports[%d]", key, j)
		}
		seen[key] = i
	}
	return nil
}

// serviceProtocol returns the upper-cased service protocol, TCP by default.
func serviceProtocol(p string) (string, error) {
	switch up := strings.ToUpper(p); up {
	case "":
		return ProtocolTCP, nil
	case ProtocolTCP, ProtocolUDP:
		return up, nil
	}
	return "", fmt.Errorf("must be TCP or UDP, got %q", p)
}

// Validate checks a NetworkPolicy as Decode leaves it (namespace set).
// Protocol and entity names are accepted in any case.
func (p NetworkPolicy) Validate() error {
	if err := validateHeader(p.APIVersion, p.Kind, KindNetworkPolicy, p.Metadata); err != nil {
		return err
	}
	if err := validateSelector("spec.endpointSelector", p.Spec.EndpointSelector); err != nil {
		return err
	}
	seenType := map[string]int{}
	for i, t := range p.Spec.PolicyTypes {
		path := fmt.Sprintf("spec.policyTypes[%d]", i)
		if t != PolicyTypeIngress && t != PolicyTypeEgress {
			return fieldError(path, "must be %s or %s, got %q", PolicyTypeIngress, PolicyTypeEgress, t)
		}
		if j, dup := seenType[t]; dup {
			return fieldError(path, "%q is already listed as spec.policyTypes[%d]", t, j)
		}
		seenType[t] = i
	}
	if len(p.Spec.PolicyTypes) == 0 {
		if len(p.Spec.Ingress) == 0 && len(p.Spec.Egress) == 0 {
			return fieldError("spec", "needs at least one ingress or egress rule, or policyTypes")
		}
	} else {
		// Rules of a direction the policy does not enforce would be
		// silently ignored: refuse them.
		if _, ok := seenType[PolicyTypeIngress]; !ok && len(p.Spec.Ingress) > 0 {
			return fieldError("spec.ingress", "has rules but spec.policyTypes does not list %s", PolicyTypeIngress)
		}
		if _, ok := seenType[PolicyTypeEgress]; !ok && len(p.Spec.Egress) > 0 {
			return fieldError("spec.egress", "has rules but spec.policyTypes does not list %s", PolicyTypeEgress)
		}
	}
	for i, r := range p.Spec.Ingress {
		path := fmt.Sprintf("spec.ingress[%d]", i)
		if err := validateRule(path, "fromEndpoints", "fromEntities", r.FromEndpoints, r.FromEntities, r.ToPorts); err != nil {
			return err
		}
	}
	for i, r := range p.Spec.Egress {
		path := fmt.Sprintf("spec.egress[%d]", i)
		if err := validateRule(path, "toEndpoints", "toEntities", r.ToEndpoints, r.ToEntities, r.ToPorts); err != nil {
			return err
		}
	}
	return nil
}

func validateRule(path, endpointsField, entitiesField string, sels []Selector, entities []string, ports []PortRule) error {
	for j, sel := range sels {
		if err := validateSelector(fmt.Sprintf("%s.%s[%d]", path, endpointsField, j), sel); err != nil {
			return err
		}
	}
	for j, e := range entities {
		switch strings.ToLower(e) {
		case EntityHost, EntityWorld, EntityAll, EntityCluster, EntityRemoteNode:
		default:
			return fieldError(fmt.Sprintf("%s.%s[%d]", path, entitiesField, j), "must be one of host, remote-node, world, all, cluster, got %q", e)
		}
	}
	for j, pr := range ports {
		ppath := fmt.Sprintf("%s.toPorts[%d]", path, j)
		switch pr.EffectiveProtocol() {
		case ProtocolTCP, ProtocolUDP, ProtocolANY:
		case ProtocolICMP:
			if pr.Port != 0 {
				return fieldError(ppath+".port", "must be 0 or absent for ICMP, got %d", pr.Port)
			}
		default:
			return fieldError(ppath+".protocol", "must be TCP, UDP, ICMP or ANY, got %q", pr.Protocol)
		}
	}
	return nil
}

// validateSelector checks matchLabels and matchExpressions of a selector at
// path.
func validateSelector(path string, sel Selector) error {
	if err := validateLabelMap(path+".matchLabels", sel.MatchLabels); err != nil {
		return err
	}
	for i, r := range sel.MatchExpressions {
		rpath := fmt.Sprintf("%s.matchExpressions[%d]", path, i)
		if err := identity.ValidateLabelKey(r.Key); err != nil {
			return fieldError(rpath+".key", "%v", err)
		}
		switch r.Operator {
		case OpIn, OpNotIn:
			if len(r.Values) == 0 {
				return fieldError(rpath+".values", "must not be empty for operator %s", r.Operator)
			}
			for j, v := range r.Values {
				if err := identity.ValidateLabelValue(v); err != nil {
					return fieldError(fmt.Sprintf("%s.values[%d]", rpath, j), "%v", err)
				}
			}
		case OpExists, OpDoesNotExist:
			if len(r.Values) > 0 {
				return fieldError(rpath+".values", "must be empty for operator %s", r.Operator)
			}
		default:
			return fieldError(rpath+".operator", "must be In, NotIn, Exists or DoesNotExist, got %q", r.Operator)
		}
	}
	return nil
}
