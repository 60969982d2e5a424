package objects

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"time"
)

// KindExternalWorkload is a VM or bare-metal host that joins its cluster
// with a one-time token (docs/vms.md). It is not applied through an agent
// (`isthmus apply`) but stored by the cluster's server, where nodes cannot
// read or write it: `isthmus vm apply`.
const KindExternalWorkload = "ExternalWorkload"

// ExternalWorkload is one enrollable host. Its name is the host's name in
// the cluster (its node record is "vm-<name>"), its labels and namespace
// are its identity, as a pod's are.
type ExternalWorkload struct {
	APIVersion string                 `json:"apiVersion"`
	Kind       string                 `json:"kind"`
	Metadata   Meta                   `json:"metadata"`
	Spec       ExternalWorkloadSpec   `json:"spec,omitzero"`
	Status     ExternalWorkloadStatus `json:"status,omitzero"` // written by the server only
}

// ExternalWorkloadSpec: the addresses the host asks for. A family left out
// is allocated from the cluster's VM range (isthmus-clustermesh --vm-cidr)
// at enrollment.
type ExternalWorkloadSpec struct {
	IPv4 string `json:"ipv4,omitempty"`
	IPv6 string `json:"ipv6,omitempty"`
}

// ExternalWorkloadStatus is what the server did with the host.
type ExternalWorkloadStatus struct {
	Enrolled bool `json:"enrolled,omitempty"`
	// Revoked is set by `isthmus vm revoke`; a new token enrolls again.
	Revoked bool `json:"revoked,omitempty"`
	// Addresses the host was given (the requested ones or allocated).
	Addresses []netip.Addr `json:"addresses,omitempty"`
	// NodeAddresses are the underlay addresses the host enrolled from.
	NodeAddresses []netip.Addr `json:"nodeAddresses,omitempty"`
	EnrolledAt    time.Time    `json:"enrolledAt,omitzero"`
	// LastSeen is the last enrollment or certificate renewal.
	LastSeen time.Time `json:"lastSeen,omitzero"`
	// CertificateExpiry is the NotAfter of the host's current certificate.
	CertificateExpiry time.Time `json:"certificateExpiry,omitzero"`
	// Generation counts the enrollments: the etcd user of the current one
	// is node-vm-<name>.<generation> (records.EnrollmentUser).
	Generation int `json:"generation,omitempty"`
}

// Requested returns the requested addresses (parsed by Validate).
func (w ExternalWorkload) Requested() (v4, v6 netip.Addr) {
	v4, _ = netip.ParseAddr(w.Spec.IPv4)
	v6, _ = netip.ParseAddr(w.Spec.IPv6)
	return v4, v6
}

// Validate checks an ExternalWorkload as DecodeExternalWorkload leaves it.
func (w ExternalWorkload) Validate() error {
	if err := validateHeader(w.APIVersion, w.Kind, KindExternalWorkload, w.Metadata); err != nil {
		return err
	}
	// The node name is "vm-<name>", a DNS label of at most 63.
	if len(w.Metadata.Name) > 60 {
		return fieldError("metadata.name", "must be at most 60 characters (the host's node name is vm-<name>), got %q", w.Metadata.Name)
	}
	for _, f := range []struct {
		path, s string
		v4      bool
	}{{"spec.ipv4", w.Spec.IPv4, true}, {"spec.ipv6", w.Spec.IPv6, false}} {
		if f.s == "" {
			continue
		}
		a, err := parseUnicast(f.s)
		if err != nil {
			return fieldError(f.path, "%v", err)
		}
		if a.Is4() != f.v4 {
			return fieldError(f.path, "%s is not an %s address", a, map[bool]string{true: "IPv4", false: "IPv6"}[f.v4])
		}
	}
	return nil
}

// DecodeExternalWorkload parses one ExternalWorkload from YAML or JSON,
// strictly (unknown fields, duplicate keys, wrong types are errors), with
// the namespace defaulted. A status in the input is dropped: only the
// server writes it.
func DecodeExternalWorkload(data []byte) (ExternalWorkload, error) {
	var raws []any
	for _, doc := range splitDocuments(data) {
		raw, err := yamlToGeneric(doc.text)
		if err != nil {
			return ExternalWorkload{}, fmt.Errorf("line %d: %w", doc.line, err)
		}
		if raw != nil {
			raws = append(raws, raw)
		}
	}
	switch {
	case len(raws) == 0:
		return ExternalWorkload{}, errors.New("no object found in input")
	case len(raws) > 1:
		return ExternalWorkload{}, fmt.Errorf("%d objects in input: give one ExternalWorkload", len(raws))
	}
	raw := raws[0]
	m, ok := raw.(map[string]any)
	if !ok {
		return ExternalWorkload{}, fmt.Errorf("must be a mapping with apiVersion, kind, metadata and spec, got %s", describeValue(raw))
	}
	if k, _ := m["kind"].(string); k != KindExternalWorkload {
		return ExternalWorkload{}, fieldError("kind", "must be %q, got %s", KindExternalWorkload, describeValue(m["kind"]))
	}
	delete(m, "status")
	var w ExternalWorkload
	if err := checkShape(raw, reflect.TypeOf(w), ""); err != nil {
		return ExternalWorkload{}, err
	}
	js, err := json.Marshal(raw)
	if err != nil {
		return ExternalWorkload{}, err
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return ExternalWorkload{}, err
	}
	w.Metadata.Namespace = namespaceOrDefault(w.Metadata.Namespace)
	if err := w.Validate(); err != nil {
		return ExternalWorkload{}, fmt.Errorf("%s %s: %w", KindExternalWorkload, w.Metadata.Name, err)
	}
	return w, nil
}
