package translate

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// NamespaceLabelDomain is appended to the prefix of a namespace label's key
// (or is the prefix of an unprefixed one) in identities.
const NamespaceLabelDomain = "ns.isthmus.io"

// reservedDomain is the prefix (or prefix suffix) of label keys that belong
// to Isthmus; pods may not set them.
const reservedDomain = "isthmus.io"

// NamespaceLabelKey maps the key of a namespace's label into the identity
// label key that carries it: prefix P and name N become
// "P.ns.isthmus.io/N", an unprefixed N becomes "ns.isthmus.io/N". It
// returns "" for a key that is not a valid label key or whose mapped
// prefix would exceed 253 characters.
func NamespaceLabelKey(k string) string {
	if identity.ValidateLabelKey(k) != nil {
		return ""
	}
	var out string
	if prefix, name, ok := strings.Cut(k, "/"); ok {
		out = prefix + "." + NamespaceLabelDomain + "/" + name
	} else {
		out = NamespaceLabelDomain + "/" + k
	}
	if identity.ValidateLabelKey(out) != nil {
		return ""
	}
	return out
}

// reservedKey reports whether a label key's prefix is isthmus.io or ends
// with .isthmus.io.
func reservedKey(k string) bool {
	prefix, _, ok := strings.Cut(k, "/")
	return ok && (prefix == reservedDomain || strings.HasSuffix(prefix, "."+reservedDomain))
}

// PodLabels returns the identity labels of a pod (without
// isthmus.io/namespace and isthmus.io/cluster, which the agent adds): the
// pod's labels, except reserved ones (prefix isthmus.io or *.isthmus.io),
// plus the namespace's labels under NamespaceLabelKey. Every label left
// out is reported in warnings, in key order.
func PodLabels(pod, namespace map[string]string) (map[string]string, []string) {
	out := make(map[string]string, len(pod)+len(namespace))
	var warnings []string
	for _, k := range slices.Sorted(maps.Keys(pod)) {
		if reservedKey(k) {
			warnings = append(warnings, fmt.Sprintf("pod label %q dropped: the isthmus.io prefix is reserved", k))
			continue
		}
		out[k] = pod[k]
	}
	for _, k := range slices.Sorted(maps.Keys(namespace)) {
		mk := NamespaceLabelKey(k)
		if mk == "" {
			warnings = append(warnings, fmt.Sprintf("namespace label %q dropped: under %s it is not a valid label key (the prefix would exceed 253 characters)", k, NamespaceLabelDomain))
			continue
		}
		out[mk] = namespace[k]
	}
	return out, warnings
}
