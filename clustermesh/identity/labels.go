package identity

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Well-known label keys. Every workload identity carries both.
const (
	LabelCluster   = "isthmus.io/cluster"
	LabelNamespace = "isthmus.io/namespace"
	// LabelReserved carries the name of a reserved identity ("host",
	// "world", ...). Get returns it for reserved IDs so that reserved
	// identities can be matched by label like any other.
	LabelReserved = "isthmus.io/reserved"
)

// Labels is a set of security labels. The zero value (nil) is an empty set.
type Labels map[string]string

// String returns the labels as "k=v,k2=v2", sorted by key, so that equal
// label sets always give the same string (it is used as a map key and in
// etcd keys).
func (l Labels) String() string { return records.LabelsString(l) }

// ParseLabels is the inverse of String. Spaces around the commas and around
// each pair are ignored; an empty (or all blank) string is an empty set.
// Keys and values must be valid Kubernetes label keys and values and a key
// may appear only once.
func ParseLabels(s string) (Labels, error) {
	l := Labels{}
	if strings.TrimSpace(s) == "" {
		return l, nil
	}
	for i, pair := range strings.Split(s, ",") {
		pair = strings.TrimSpace(pair)
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return nil, fmt.Errorf("labels %q: pair %d (%q): want key=value", s, i+1, pair)
		}
		if err := ValidateLabelKey(k); err != nil {
			return nil, fmt.Errorf("labels %q: pair %d: %w", s, i+1, err)
		}
		if err := ValidateLabelValue(v); err != nil {
			return nil, fmt.Errorf("labels %q: pair %d (key %q): %w", s, i+1, k, err)
		}
		if _, dup := l[k]; dup {
			return nil, fmt.Errorf("labels %q: key %q appears more than once", s, k)
		}
		l[k] = v
	}
	return l, nil
}

// Has reports whether every key/value pair of sel is present in l. An empty
// selector matches every label set.
func (l Labels) Has(sel map[string]string) bool {
	for k, v := range sel {
		if got, ok := l[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Validate checks every key and value; the error names the first bad one
// (in key order, so the message is stable).
func (l Labels) Validate() error {
	for _, k := range slices.Sorted(maps.Keys(l)) {
		if err := ValidateLabelKey(k); err != nil {
			return err
		}
		if err := ValidateLabelValue(l[k]); err != nil {
			return fmt.Errorf("label %q: %w", k, err)
		}
	}
	return nil
}

// Clone returns an independent copy (nil stays nil).
func (l Labels) Clone() Labels {
	return maps.Clone(l)
}

// The patterns below are matched by hand: labels are validated for every
// object decoded (ten thousand services in a bulk apply, in each process
// that reads them), and the regular expressions cost several times more.

// isLabelName reports whether s is the name part of a key, or a non-empty
// value: ^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$ (Kubernetes
// "qualified name").
func isLabelName(s string) bool {
	return matchesEnds(s, isAlnum, func(c byte) bool { return isAlnum(c) || c == '-' || c == '_' || c == '.' })
}

// IsDNSLabel reports whether s is one DNS-1123 label:
// ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ (no length limit).
func IsDNSLabel(s string) bool {
	lowerAlnum := func(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }
	return matchesEnds(s, lowerAlnum, func(c byte) bool { return lowerAlnum(c) || c == '-' })
}

// matchesEnds reports whether s is not empty, starts and ends with a byte
// of end and holds only bytes of inner (a superset of end).
func matchesEnds(s string, end, inner func(byte) bool) bool {
	if s == "" || !end(s[0]) || !end(s[len(s)-1]) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !inner(s[i]) {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// ValidateLabelKey checks a label key by the Kubernetes rules: an optional
// DNS-1123 subdomain prefix (at most 253 characters) and "/", then a name of
// at most 63 characters of [A-Za-z0-9-_.] that starts and ends alphanumeric.
func ValidateLabelKey(k string) error {
	name := k
	if prefix, rest, ok := strings.Cut(k, "/"); ok {
		if err := validateDNSSubdomain(prefix); err != nil {
			return fmt.Errorf("label key %q: prefix %w", k, err)
		}
		name = rest
	}
	switch {
	case name == "":
		return fmt.Errorf("label key %q: name must not be empty", k)
	case len(name) > 63:
		return fmt.Errorf("label key %q: name must be at most 63 characters", k)
	case !isLabelName(name):
		return fmt.Errorf("label key %q: name must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric", k)
	}
	return nil
}

// ValidateLabelValue checks a label value by the Kubernetes rules: empty, or
// at most 63 characters of [A-Za-z0-9-_.] starting and ending alphanumeric.
func ValidateLabelValue(v string) error {
	switch {
	case v == "":
		return nil
	case len(v) > 63:
		return fmt.Errorf("label value %q: must be at most 63 characters", v)
	case !isLabelName(v):
		return fmt.Errorf("label value %q: must consist of alphanumerics, '-', '_' or '.', and start and end with an alphanumeric", v)
	}
	return nil
}

func validateDNSSubdomain(s string) error {
	if s == "" {
		return fmt.Errorf("must not be empty")
	}
	if len(s) > 253 {
		return fmt.Errorf("%q must be at most 253 characters", s)
	}
	for part := range strings.SplitSeq(s, ".") {
		if len(part) > 63 || !IsDNSLabel(part) {
			return fmt.Errorf("%q must be a DNS subdomain (lower-case alphanumerics, '-' and '.')", s)
		}
	}
	return nil
}
