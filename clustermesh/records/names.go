package records

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Cluster and identity numbering. The identity package has the same
// values; it imports records, so records cannot import it (a test there
// checks they agree).
const (
	// MaxClusterID is the largest cluster ID (IDs are 1..4095).
	MaxClusterID = 4095
	// MaxReservedIdentity is the largest reserved (cluster-less) identity.
	MaxReservedIdentity = 255
	// identityLocalBits is the width of the per-cluster part of an
	// identity: identity = clusterID<<20 | n.
	identityLocalBits = 20
	// maxLocalIdentity is the largest per-cluster identity number.
	maxLocalIdentity = 1<<identityLocalBits - 1
	// MaxClusterNameLen bounds cluster names: they become etcd user names
	// (remote-<cluster>) and certificate common names.
	MaxClusterNameLen = 32
)

// ErrMalformed is wrapped by errors about values or keys that do not parse
// or break a rule of their own.
var ErrMalformed = errors.New("malformed record")

// ErrClusterMismatch is wrapped by errors about records whose cluster name
// or ID disagrees with their key or with the connection they came from.
var ErrClusterMismatch = errors.New("cluster mismatch")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

func mismatch(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrClusterMismatch, fmt.Sprintf(format, args...))
}

// isDNSLabel reports whether s matches ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$
// (length is checked by the callers). Hand-written rather than a regexp:
// it runs for every name of every record a mirror or an agent decodes.
func isDNSLabel(s string) bool {
	if s == "" || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// isLabelName reports whether s matches the Kubernetes "qualified name"
// characters, ^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$, of label names
// and values.
func isLabelName(s string) bool {
	if s == "" || !isAlnum(s[0]) || !isAlnum(s[len(s)-1]) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !isAlnum(c) && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// ValidateClusterName checks a cluster name: a DNS-1123 label of at most
// MaxClusterNameLen characters.
func ValidateClusterName(name string) error {
	if len(name) > MaxClusterNameLen || !isDNSLabel(name) {
		return malformed("cluster name %q: must be 1-%d lower-case alphanumerics or '-', starting and ending alphanumeric", name, MaxClusterNameLen)
	}
	return nil
}

// ValidateClusterID checks a cluster ID: 1..MaxClusterID.
func ValidateClusterID(id uint32) error {
	if id < 1 || id > MaxClusterID {
		return malformed("cluster ID %d: must be 1-%d", id, MaxClusterID)
	}
	return nil
}

// validateName checks a namespace or service name: a DNS-1123 label.
func validateName(what, s string) error {
	if len(s) > 63 || !isDNSLabel(s) {
		return malformed("%s %q: must be a DNS-1123 label (1-63 lower-case alphanumerics or '-')", what, s)
	}
	return nil
}

// ValidateNodeName checks a node name: a DNS-1123 subdomain (as Kubernetes
// node names), so it never contains '/'.
func ValidateNodeName(s string) error {
	if err := validateSubdomain(s); err != nil {
		return malformed("node name %q: %v", s, err)
	}
	return nil
}

func validateSubdomain(s string) error {
	if s == "" || len(s) > 253 {
		return errors.New("must be 1-253 characters")
	}
	for part := range strings.SplitSeq(s, ".") {
		if len(part) > 63 || !isDNSLabel(part) {
			return errors.New("must be a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.')")
		}
	}
	return nil
}

// validateLabelKey and validateLabelValue follow the Kubernetes rules, as
// identity.ValidateLabelKey/Value do.
func validateLabelKey(k string) error {
	name := k
	if prefix, rest, ok := strings.Cut(k, "/"); ok {
		if err := validateSubdomain(prefix); err != nil {
			return malformed("label key %q: prefix %v", k, err)
		}
		name = rest
	}
	if len(name) > 63 || !isLabelName(name) {
		return malformed("label key %q: name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric", k)
	}
	return nil
}

func validateLabelValue(v string) error {
	if v != "" && (len(v) > 63 || !isLabelName(v)) {
		return malformed("label value %q: must be at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric", v)
	}
	return nil
}

// ValidateLabels checks every key and value of a label map.
func ValidateLabels(l map[string]string) error {
	for _, k := range slices.Sorted(maps.Keys(l)) {
		if err := validateLabelKey(k); err != nil {
			return err
		}
		if err := validateLabelValue(l[k]); err != nil {
			return fmt.Errorf("label %q: %w", k, err)
		}
	}
	return nil
}

// LabelsString returns the canonical "k=v,k2=v2" form (sorted by key) used
// in identity keys; identity.Labels.String gives the same.
func LabelsString(l map[string]string) string {
	var b strings.Builder
	for i, k := range slices.Sorted(maps.Keys(l)) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k)
		b.WriteByte('=')
		b.WriteString(l[k])
	}
	return b.String()
}

// ParseLabelsString parses the canonical form and rejects every other
// spelling (unsorted, spaces, duplicates), so that one label set has exactly
// one key.
func ParseLabelsString(s string) (map[string]string, error) {
	if s == "" {
		return nil, malformed("empty label set")
	}
	l := map[string]string{}
	prev := ""
	for i, pair := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return nil, malformed("labels %q: pair %d: want key=value", s, i+1)
		}
		if err := validateLabelKey(k); err != nil {
			return nil, err
		}
		if err := validateLabelValue(v); err != nil {
			return nil, fmt.Errorf("label %q: %w", k, err)
		}
		if i > 0 && k <= prev {
			return nil, malformed("labels %q: keys must be sorted and unique", s)
		}
		prev = k
		l[k] = v
	}
	return l, nil
}

// validateAddr checks a unicast-ish address in canonical form: valid, no
// zone, IPv4 not written as IPv4-mapped IPv6 (one address, one spelling).
func validateAddr(what string, a netip.Addr) error {
	switch {
	case !a.IsValid():
		return malformed("%s: missing or invalid IP address", what)
	case a.Zone() != "":
		return malformed("%s %s: IPv6 zones are not allowed", what, a)
	case a.Is4In6():
		return malformed("%s %s: write IPv4 addresses as IPv4, not IPv4-mapped IPv6", what, a)
	case a.IsUnspecified() || a.IsMulticast():
		return malformed("%s %s: unspecified and multicast addresses are not allowed", what, a)
	}
	return nil
}

// validatePrefix checks a CIDR in canonical form (host bits zero).
func validatePrefix(what string, p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return malformed("%s: missing or invalid prefix", what)
	case p.Addr().Zone() != "" || p.Addr().Is4In6():
		return malformed("%s %s: use a plain IPv4 or IPv6 prefix", what, p)
	case p != p.Masked():
		return malformed("%s %s: host bits set (did you mean %s?)", what, p, p.Masked())
	}
	return nil
}

// validateCIDRs checks a list of pod CIDRs: each canonical, none
// overlapping another.
func validateCIDRs(what string, ps []netip.Prefix) error {
	for i, p := range ps {
		if err := validatePrefix(fmt.Sprintf("%s[%d]", what, i), p); err != nil {
			return err
		}
		for j := range i {
			if p.Overlaps(ps[j]) {
				return malformed("%s: %s overlaps %s", what, p, ps[j])
			}
		}
	}
	return nil
}

// validateIdentity checks a numeric identity: reserved (1..255) or
// cluster-scoped with a valid cluster and a non-zero local part.
func validateIdentity(id uint32) error {
	switch {
	case id == 0:
		return malformed("identity 0 (unknown) is not allowed")
	case id <= MaxReservedIdentity:
		return nil
	case id>>identityLocalBits == 0 || id&maxLocalIdentity == 0:
		return malformed("identity %d: neither reserved (1-%d) nor cluster-scoped (clusterID<<20 | 1..%d)", id, MaxReservedIdentity, maxLocalIdentity)
	}
	return nil
}
