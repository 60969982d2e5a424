package v1alpha1

import (
	"fmt"
	"maps"
	"slices"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// ToObject returns the Isthmus NetworkPolicy of the resource, defaulted
// (protocols and entities as objects.Decode leaves them) and validated: an
// error names the field, as objects.NetworkPolicy.Validate does.
func (p *NetworkPolicy) ToObject() (objects.NetworkPolicy, error) {
	if p == nil {
		return objects.NetworkPolicy{}, fmt.Errorf("networkpolicy: nil")
	}
	out := objects.NetworkPolicy{
		APIVersion: objects.APIVersion,
		Kind:       objects.KindNetworkPolicy,
		Metadata: objects.Meta{
			Name:        p.Name,
			Namespace:   p.Namespace,
			Labels:      maps.Clone(p.Labels),
			Annotations: maps.Clone(p.Annotations),
		},
		Spec: objects.PolicySpec{EndpointSelector: p.Spec.EndpointSelector.toObject()},
	}
	for _, t := range p.Spec.PolicyTypes {
		out.Spec.PolicyTypes = append(out.Spec.PolicyTypes, string(t))
	}
	for i, r := range p.Spec.Ingress {
		ports, err := portRules(fmt.Sprintf("spec.ingress[%d]", i), r.ToPorts)
		if err != nil {
			return objects.NetworkPolicy{}, err
		}
		out.Spec.Ingress = append(out.Spec.Ingress, objects.IngressRule{
			FromEndpoints: selectors(r.FromEndpoints), FromEntities: entities(r.FromEntities), ToPorts: ports,
		})
	}
	for i, r := range p.Spec.Egress {
		ports, err := portRules(fmt.Sprintf("spec.egress[%d]", i), r.ToPorts)
		if err != nil {
			return objects.NetworkPolicy{}, err
		}
		out.Spec.Egress = append(out.Spec.Egress, objects.EgressRule{
			ToEndpoints: selectors(r.ToEndpoints), ToEntities: entities(r.ToEntities), ToPorts: ports,
		})
	}
	if err := out.Validate(); err != nil {
		return objects.NetworkPolicy{}, err
	}
	for i := range out.Spec.Ingress {
		normPorts(out.Spec.Ingress[i].ToPorts)
	}
	for i := range out.Spec.Egress {
		normPorts(out.Spec.Egress[i].ToPorts)
	}
	return out, nil
}

func (s Selector) toObject() objects.Selector {
	out := objects.Selector{MatchLabels: maps.Clone(s.MatchLabels)}
	for _, r := range s.MatchExpressions {
		out.MatchExpressions = append(out.MatchExpressions, objects.LabelSelectorRequirement{Key: r.Key, Operator: r.Operator, Values: slices.Clone(r.Values)})
	}
	return out
}

func selectors(in []Selector) []objects.Selector {
	var out []objects.Selector
	for _, s := range in {
		out = append(out, s.toObject())
	}
	return out
}

func entities(in []Entity) []string {
	var out []string
	for _, e := range in {
		out = append(out, string(e))
	}
	return out
}

func portRules(path string, in []PortRule) ([]objects.PortRule, error) {
	var out []objects.PortRule
	for j, r := range in {
		if r.Port < 0 || r.Port > 65535 {
			return nil, fmt.Errorf("%s.toPorts[%d].port: must be 0-65535, got %d", path, j, r.Port)
		}
		out = append(out, objects.PortRule{Port: uint16(r.Port), Protocol: r.Protocol})
	}
	return out, nil
}

// normPorts applies the protocol defaults objects.Decode applies.
func normPorts(ports []objects.PortRule) {
	for i := range ports {
		ports[i].Protocol = ports[i].EffectiveProtocol()
	}
}
