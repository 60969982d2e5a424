package objects

import (
	"fmt"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/bpf"
)

// Frontends returns every VIP x port of the service, in spec order (VIPs
// outer, ports inner). It fails on the first VIP, port or protocol that is
// not valid.
func (s Service) Frontends() ([]bpf.Frontend, error) {
	fs, err := s.frontends()
	if err != nil {
		return nil, fmt.Errorf("service %s/%s: %w", namespaceOrDefault(s.Metadata.Namespace), s.Metadata.Name, err)
	}
	return fs, nil
}

// frontends returns the frontends that parse plus the first error, so that
// CheckConflicts can still compare a stored service that went bad.
func (s Service) frontends() ([]bpf.Frontend, error) {
	var out []bpf.Frontend
	var firstErr error
	keep := func(err error) {
		if firstErr == nil {
			firstErr = err
		}
	}
	for i, v := range s.Spec.VIPs {
		vip, err := parseUnicast(v)
		if err != nil {
			keep(fieldError(fmt.Sprintf("spec.vips[%d]", i), "%v", err))
			continue
		}
		for j, p := range s.Spec.Ports {
			proto, err := serviceProtocol(p.Protocol)
			if err != nil {
				keep(fieldError(fmt.Sprintf("spec.ports[%d].protocol", j), "%v", err))
				continue
			}
			if p.Port == 0 {
				keep(fieldError(fmt.Sprintf("spec.ports[%d].port", j), "must be 1-65535, got 0"))
				continue
			}
			out = append(out, bpf.Frontend{VIP: vip, Port: p.Port, Proto: protoNumber(proto)})
		}
	}
	return out, firstErr
}

func protoNumber(p string) bpf.Proto {
	if p == ProtocolUDP {
		return bpf.ProtoUDP
	}
	return bpf.ProtoTCP
}

// CheckConflicts returns an error when a frontend (VIP, port, protocol) of s,
// at a VIP or an external address,
// is already used by a service in existing with a different Key. A service
// with the same Key is the one being updated and never conflicts. Invalid
// frontends of existing services are ignored; invalid ones of s are an
// error.
func CheckConflicts(existing []Service, s Service) error {
	mine, err := s.AllFrontends()
	if err != nil {
		return err
	}
	key := Key(s)
	for _, e := range existing {
		if Key(e) == key {
			continue
		}
		theirs, _ := e.AllFrontends()
		used := make(map[bpf.Frontend]bool, len(theirs))
		for _, f := range theirs {
			used[f] = true
		}
		for _, f := range mine {
			if used[f] && f.IsNodePort() {
				return fmt.Errorf("service %s/%s: node port %d/%s is already used by service %s/%s",
					namespaceOrDefault(s.Metadata.Namespace), s.Metadata.Name, f.Port, f.Proto,
					namespaceOrDefault(e.Metadata.Namespace), e.Metadata.Name)
			}
			if used[f] {
				return fmt.Errorf("service %s/%s: frontend %s is already used by service %s/%s",
					namespaceOrDefault(s.Metadata.Namespace), s.Metadata.Name, f,
					namespaceOrDefault(e.Metadata.Namespace), e.Metadata.Name)
			}
		}
	}
	return nil
}

// AllFrontends returns every frontend a service claims: at its VIPs
// (Frontends), at its external addresses (ExternalFrontends) and its node
// ports (NodePortFrontends). Like frontends, it returns those that parse
// with the first error, so that a stored service that went bad can still
// be compared.
func (s Service) AllFrontends() ([]bpf.Frontend, error) {
	fs, err := s.frontends()
	fs = append(fs, s.ExternalFrontends()...)
	fs = append(fs, s.NodePortFrontends()...)
	if err != nil {
		return fs, fmt.Errorf("service %s/%s: %w", namespaceOrDefault(s.Metadata.Namespace), s.Metadata.Name, err)
	}
	return fs, nil
}

// ExternalAddrs returns the addresses the service answers on from outside
// the mesh: its external IPs and the load-balancer addresses in its status
// (those LB-IPAM assigned), each once, in that order. Addresses that do not
// parse are left out (Validate refuses them in the spec; the status is
// Isthmus's own).
func (s Service) ExternalAddrs() []netip.Addr {
	var out []netip.Addr
	seen := map[netip.Addr]bool{}
	add := func(v string) {
		a, err := parseUnicast(v)
		if err != nil || seen[a] {
			return
		}
		seen[a] = true
		out = append(out, a)
	}
	for _, v := range s.Spec.ExternalIPs {
		add(v)
	}
	for _, in := range s.Status.LoadBalancer.Ingress {
		add(in.IP)
	}
	return out
}

// ExternalFrontends returns every external address (ExternalAddrs) x port
// of the service, in that order: the frontends traffic from outside the
// mesh reaches it on. Ports that are not valid are left out (Frontends
// reports them).
func (s Service) ExternalFrontends() []bpf.Frontend {
	var out []bpf.Frontend
	for _, a := range s.ExternalAddrs() {
		for _, p := range s.Spec.Ports {
			proto, err := serviceProtocol(p.Protocol)
			if err != nil || p.Port == 0 {
				continue
			}
			out = append(out, bpf.Frontend{VIP: a, Port: p.Port, Proto: protoNumber(proto)})
		}
	}
	return out
}

// NodePortFrontends returns the services-map frontends of the service's
// node ports (bpf.NodePort: any node address), one per family of its VIPs
// and port with a nodePort, VIPs outer and ports inner. Ports that are not
// valid are left out (Validate reports them).
func (s Service) NodePortFrontends() []bpf.Frontend {
	if !s.Spec.HasNodePorts() {
		return nil
	}
	var out []bpf.Frontend
	seen := map[bool]bool{}
	for _, v := range s.Spec.VIPs {
		a, err := parseUnicast(v)
		if err != nil || seen[a.Is6()] {
			continue
		}
		seen[a.Is6()] = true
		for _, p := range s.Spec.Ports {
			proto, err := serviceProtocol(p.Protocol)
			if err != nil || p.NodePort == 0 {
				continue
			}
			out = append(out, bpf.NodePort(a.Is6(), p.NodePort, protoNumber(proto)))
		}
	}
	return out
}

// PortFor returns the port of the service that frontend f (one of its
// frontends: at a VIP or an external address, or a node port) stands for.
func (s Service) PortFor(f bpf.Frontend) (ServicePort, bool) {
	for _, p := range s.Spec.Ports {
		proto, err := serviceProtocol(p.Protocol)
		if err != nil || protoNumber(proto) != f.Proto {
			continue
		}
		if (f.IsNodePort() && p.NodePort == f.Port) || (!f.IsNodePort() && p.Port == f.Port) {
			return p, true
		}
	}
	return ServicePort{}, false
}
