package translate

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/servicesync"
)

// keptAnnotations are the Service annotations carried into the Isthmus
// Service (the global-service ones).
var keptAnnotations = []string{servicesync.AnnotationGlobal, servicesync.AnnotationShared, servicesync.AnnotationAffinity}

// Service translates a Kubernetes Service and its EndpointSlices (slices
// of other services are ignored) into an Isthmus Service. served is false,
// with no error, for Services that have no cluster IP to serve: headless
// (clusterIP None), ExternalName, or not yet allocated. See the package
// documentation for the rules; ServiceWithWarnings also returns what was
// approximated.
func Service(svc *corev1.Service, slices []*discoveryv1.EndpointSlice) (objects.Service, bool, error) {
	out, served, _, err := ServiceWithWarnings(svc, slices)
	return out, served, err
}

// ServiceWithWarnings is Service, also returning warnings about what the
// Isthmus Service cannot express and was approximated: a named targetPort
// that resolves to different ports in different slices (the most common
// port wins; the backends of the slices that disagree are left out, so no
// traffic reaches a wrong port), and a named targetPort no slice lists.
func ServiceWithWarnings(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) (objects.Service, bool, []string, error) {
	if svc == nil {
		return objects.Service{}, false, nil, fmt.Errorf("service: nil")
	}
	where := svc.Namespace + "/" + svc.Name
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return objects.Service{}, false, nil, nil
	}
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	if len(ips) == 0 || ips[0] == corev1.ClusterIPNone {
		return objects.Service{}, false, nil, nil
	}

	out := objects.Service{
		APIVersion: objects.APIVersion,
		Kind:       objects.KindService,
		Metadata:   objects.Meta{Name: svc.Name, Namespace: svc.Namespace},
		Spec:       objects.ServiceSpec{VIPs: slices.Clone(ips)},
	}
	for _, k := range keptAnnotations {
		if v, ok := svc.Annotations[k]; ok {
			if out.Metadata.Annotations == nil {
				out.Metadata.Annotations = map[string]string{}
			}
			out.Metadata.Annotations[k] = v
		}
	}
	families := map[discoveryv1.AddressType]bool{}
	for _, ip := range ips {
		if a, err := netip.ParseAddr(ip); err == nil && a.Unmap().Is4() {
			families[discoveryv1.AddressTypeIPv4] = true
		} else if err == nil {
			families[discoveryv1.AddressTypeIPv6] = true
		}
	}

	// The service's slices, in a stable order.
	var own []*discoveryv1.EndpointSlice
	for _, s := range eps {
		if s != nil && s.Namespace == svc.Namespace && s.Labels[discoveryv1.LabelServiceName] == svc.Name && families[s.AddressType] {
			own = append(own, s)
		}
	}
	slices.SortFunc(own, func(a, b *discoveryv1.EndpointSlice) int { return cmp.Compare(a.Name, b.Name) })

	var warnings []string
	excluded := map[*discoveryv1.EndpointSlice]bool{}
	for i, p := range svc.Spec.Ports {
		path := fmt.Sprintf("service %s: spec.ports[%d]", where, i)
		proto, err := serviceProtocol(p.Protocol)
		if err != nil {
			return objects.Service{}, false, nil, fmt.Errorf("%s.protocol: %w", path, err)
		}
		if p.Port < 1 || p.Port > 65535 {
			return objects.Service{}, false, nil, fmt.Errorf("%s.port: must be 1-65535, got %d", path, p.Port)
		}
		sp := objects.ServicePort{Name: p.Name, Port: uint16(p.Port), Protocol: proto}
		switch {
		case p.TargetPort.Type == intstr.Int && p.TargetPort.IntVal != 0:
			if p.TargetPort.IntVal < 1 || p.TargetPort.IntVal > 65535 {
				return objects.Service{}, false, nil, fmt.Errorf("%s.targetPort: must be 1-65535, got %d", path, p.TargetPort.IntVal)
			}
			sp.TargetPort = uint16(p.TargetPort.IntVal)
		case p.TargetPort.Type == intstr.String && p.TargetPort.StrVal != "":
			port, w := namedTargetPort(own, p, excluded)
			if w != "" {
				warnings = append(warnings, fmt.Sprintf("%s.targetPort %q: %s", path, p.TargetPort.StrVal, w))
			}
			sp.TargetPort = port
		}
		out.Spec.Ports = append(out.Spec.Ports, sp)
	}

	warnings = append(warnings, nodePorts(svc, &out)...)
	warnings = append(warnings, external(svc, &out)...)

	// Backends: ready addresses of the slices not left out.
	seen := map[netip.Addr]bool{}
	var addrs []netip.Addr
	for _, s := range own {
		if excluded[s] {
			continue
		}
		for _, ep := range s.Endpoints {
			if !ready(ep.Conditions) {
				continue
			}
			for _, a := range ep.Addresses {
				ip, err := netip.ParseAddr(a)
				if err != nil {
					warnings = append(warnings, fmt.Sprintf("EndpointSlice %s/%s: address %q: not an IP address, skipped", s.Namespace, s.Name, a))
					continue
				}
				ip = ip.Unmap()
				if !seen[ip] {
					seen[ip] = true
					addrs = append(addrs, ip)
				}
			}
		}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	for _, a := range addrs {
		out.Spec.Backends = append(out.Spec.Backends, objects.ExplicitBackend{IP: a.String()})
	}

	if err := out.Validate(); err != nil {
		return objects.Service{}, false, nil, fmt.Errorf("service %s: %w", where, err)
	}
	return out, true, warnings, nil
}

// nodePorts carries the node ports of a NodePort or LoadBalancer Service
// (and its externalTrafficPolicy) into out, whose ports were translated in
// the Service's order: out becomes an Isthmus NodePort Service (external
// makes a LoadBalancer one a LoadBalancer again). The node ports are left
// out, with a warning and the cluster IPs still served, when Isthmus
// cannot serve them: a port without one (a LoadBalancer with
// allocateLoadBalancerNodePorts false), or one outside Isthmus's fixed
// range (an API server with another --service-node-port-range).
func nodePorts(svc *corev1.Service, out *objects.Service) []string {
	if svc.Spec.Type != corev1.ServiceTypeNodePort && svc.Spec.Type != corev1.ServiceTypeLoadBalancer {
		return nil
	}
	has := false
	for _, p := range svc.Spec.Ports {
		has = has || p.NodePort != 0
	}
	if !has {
		return nil // not allocated (yet, or allocateLoadBalancerNodePorts false)
	}
	where := svc.Namespace + "/" + svc.Name
	for i, p := range svc.Spec.Ports {
		if p.NodePort == 0 {
			return []string{fmt.Sprintf("service %s: spec.ports[%d] has no nodePort: node ports not served (Isthmus serves them for every port or none)", where, i)}
		}
		if p.NodePort < objects.NodePortMin || p.NodePort > objects.NodePortMax {
			return []string{fmt.Sprintf("service %s: spec.ports[%d].nodePort %d is outside %d-%d: node ports not served", where, i, p.NodePort, objects.NodePortMin, objects.NodePortMax)}
		}
	}
	out.Spec.Type = objects.ServiceTypeNodePort
	for i, p := range svc.Spec.Ports {
		out.Spec.Ports[i].NodePort = uint16(p.NodePort)
	}
	if svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
		out.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
	}
	return nil
}

// external carries the addresses a Service answers on from outside the
// mesh: for type LoadBalancer (with no spec.loadBalancerClass: another
// class is another controller's), the requested spec.loadBalancerIP and
// the addresses of status.loadBalancer.ingress (written by the clustermesh
// server from LB-IPAM's assignment; the agents serve what the status
// says, as kube-proxy does), with externalTrafficPolicy; for every type,
// spec.externalIPs. Addresses Isthmus cannot serve (not unicast, already
// a VIP, a second one of a family) are left out with a warning.
func external(svc *corev1.Service, out *objects.Service) []string {
	where := svc.Namespace + "/" + svc.Name
	var warnings []string
	vips := map[netip.Addr]bool{}
	vipFamilies := map[bool]bool{}
	for _, v := range out.Spec.VIPs {
		if a, err := netip.ParseAddr(v); err == nil {
			vips[a] = true
			vipFamilies[a.Is4()] = true
		}
	}
	// usable parses v and reports whether it is a unicast address not in
	// seen (which it joins).
	usable := func(field, v string, seen map[netip.Addr]bool) (netip.Addr, bool) {
		a, err := netip.ParseAddr(v)
		switch {
		case err != nil || a.Zone() != "" || a.Is4In6() || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback():
			warnings = append(warnings, fmt.Sprintf("service %s: %s %q is not a unicast IP address: not served", where, field, v))
		case seen[a]:
			warnings = append(warnings, fmt.Sprintf("service %s: %s %s is listed twice (or is a cluster IP): served once", where, field, a))
		default:
			seen[a] = true
			return a, true
		}
		return a, false
	}
	// The spec's lists may not share addresses (objects.Service.Validate);
	// the status is what was assigned, so it holds the requested address.
	spec := maps.Clone(vips)
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer && svc.Spec.LoadBalancerClass == nil {
		out.Spec.Type = objects.ServiceTypeLoadBalancer
		if svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
			out.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
		}
		if v := svc.Spec.LoadBalancerIP; v != "" {
			if a, ok := usable("spec.loadBalancerIP", v, spec); ok && vipFamilies[a.Is4()] {
				out.Spec.LoadBalancerIPs = []string{a.String()}
			} else if ok {
				warnings = append(warnings, fmt.Sprintf("service %s: spec.loadBalancerIP %s: the service has no cluster IP of its family: not requested", where, a))
			}
		}
		status := maps.Clone(vips)
		for i, in := range svc.Status.LoadBalancer.Ingress {
			if in.IP == "" {
				continue // a hostname: another controller's
			}
			if a, ok := usable(fmt.Sprintf("status.loadBalancer.ingress[%d].ip", i), in.IP, status); ok {
				out.Status.LoadBalancer.Ingress = append(out.Status.LoadBalancer.Ingress, objects.LoadBalancerIngress{IP: a.String()})
			}
		}
	}
	for i, v := range svc.Spec.ExternalIPs {
		if a, ok := usable(fmt.Sprintf("spec.externalIPs[%d]", i), v, spec); ok {
			out.Spec.ExternalIPs = append(out.Spec.ExternalIPs, a.String())
		}
	}
	return warnings
}

// serviceProtocol maps a Kubernetes protocol (empty = TCP) to the Isthmus
// one.
func serviceProtocol(p corev1.Protocol) (string, error) {
	switch p {
	case "", corev1.ProtocolTCP:
		return objects.ProtocolTCP, nil
	case corev1.ProtocolUDP:
		return objects.ProtocolUDP, nil
	case corev1.ProtocolSCTP:
		return "", fmt.Errorf("unsupported: SCTP")
	}
	return "", fmt.Errorf("unsupported: %q", p)
}

func ready(c discoveryv1.EndpointConditions) bool {
	return (c.Ready == nil || *c.Ready) && (c.Terminating == nil || !*c.Terminating)
}

// namedTargetPort resolves a Service port's named target port from the
// slices' port of the same name and protocol: the port of most ready
// endpoints (ties: the lowest). Slices that resolve it differently, or do
// not list it, are added to excluded.
func namedTargetPort(own []*discoveryv1.EndpointSlice, p corev1.ServicePort, excluded map[*discoveryv1.EndpointSlice]bool) (uint16, string) {
	proto := p.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	portOf := map[*discoveryv1.EndpointSlice]int32{}
	votes := map[int32]int{}
	for _, s := range own {
		for _, sp := range s.Ports {
			name, sproto := "", corev1.ProtocolTCP
			if sp.Name != nil {
				name = *sp.Name
			}
			if sp.Protocol != nil {
				sproto = *sp.Protocol
			}
			if name != p.Name || sproto != proto || sp.Port == nil || *sp.Port < 1 || *sp.Port > 65535 {
				continue
			}
			portOf[s] = *sp.Port
			n := 0
			for _, ep := range s.Endpoints {
				if ready(ep.Conditions) {
					n++
				}
			}
			votes[*sp.Port] += n
			break
		}
	}
	if len(votes) == 0 {
		if len(own) == 0 {
			return 0, ""
		}
		for _, s := range own {
			excluded[s] = true
		}
		return 0, "no EndpointSlice lists this port: the service has no backends"
	}
	ports := slices.Sorted(maps.Keys(votes))
	best := ports[0]
	for _, port := range ports {
		if votes[port] > votes[best] {
			best = port
		}
	}
	var w string
	for _, s := range own {
		if port, ok := portOf[s]; !ok || port != best {
			excluded[s] = true
			if w == "" {
				w = fmt.Sprintf("backends resolve it to different ports (%v); using %d and leaving out the backends of slices that do not", ports, best)
			}
		}
	}
	return uint16(best), w
}
