package records

import (
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"
)

// LBIPAMPrefix holds LB-IPAM's assignments, one per Service of type
// LoadBalancer: isthmus/state/lbipam/v1/<namespace>/<name>. Only the
// clustermesh server writes them (a node's credential may not); they are
// the cluster's own and never mirrored to other clusters.
const LBIPAMPrefix = StateRoot + "lbipam/v1/"

// LBIPAMKey returns "isthmus/state/lbipam/v1/<namespace>/<name>".
func LBIPAMKey(namespace, name string) string { return LBIPAMPrefix + namespace + "/" + name }

// ParseLBIPAMKey returns the namespace and name of an assignment key.
func ParseLBIPAMKey(key string) (namespace, name string, err error) {
	rest, ok := cut(key, LBIPAMPrefix)
	if !ok {
		return "", "", malformed("key %q is not under %s", key, LBIPAMPrefix)
	}
	namespace, name, ok = strings.Cut(rest, "/")
	if !ok {
		return "", "", malformed("key %q: want %s<namespace>/<name>", key, LBIPAMPrefix)
	}
	if err := validateName("namespace", namespace); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	if err := validateName("service name", name); err != nil {
		return "", "", malformed("key %q: %v", key, err)
	}
	return namespace, name, nil
}

// maxLBIPAMText bounds the free-text fields of an assignment.
const maxLBIPAMText = 4096

// LBAssignment is stored at LBIPAMKey(Namespace, Name): the load-balancer
// addresses LB-IPAM assigned to a service, or why it could not.
type LBAssignment struct {
	Version   int         `json:"version"`
	Namespace string      `json:"namespace"`
	Name      string      `json:"name"`
	Addresses []LBAddress `json:"addresses,omitempty"`
	// Refused is the reason the service lacks an address it asked for.
	Refused string `json:"refused,omitempty"`
}

// LBAddress is one assigned address.
type LBAddress struct {
	IP   netip.Addr `json:"ip"`
	Pool string     `json:"pool"`
	// Kept says why the address stays although its pool no longer offers
	// it to the service.
	Kept string `json:"kept,omitempty"`
}

// Validate checks the record: names, at most one canonical unicast address
// per family, pool names, bounded texts.
func (r LBAssignment) Validate() error {
	if err := checkVersion(r.Version); err != nil {
		return err
	}
	if err := validateName("namespace", r.Namespace); err != nil {
		return err
	}
	if err := validateName("service name", r.Name); err != nil {
		return err
	}
	if len(r.Addresses) > 2 {
		return malformed("lbipam %s/%s: %d addresses, at most one per family", r.Namespace, r.Name, len(r.Addresses))
	}
	families := map[int]bool{}
	for i, a := range r.Addresses {
		what := "addresses[" + strconv.Itoa(i) + "]"
		if err := validateAddr(what, a.IP); err != nil {
			return err
		}
		if a.IP.IsLoopback() {
			return malformed("%s %s: loopback address", what, a.IP)
		}
		if families[a.IP.BitLen()] {
			return malformed("%s %s: a second address of its family", what, a.IP)
		}
		families[a.IP.BitLen()] = true
		if err := validateName(what+".pool", a.Pool); err != nil {
			return err
		}
		if err := validText(what+".kept", a.Kept); err != nil {
			return err
		}
	}
	return validText("refused", r.Refused)
}

func validText(what, s string) error {
	if len(s) > maxLBIPAMText || !utf8.ValidString(s) {
		return malformed("%s: at most %d bytes of UTF-8", what, maxLBIPAMText)
	}
	return nil
}

// Marshal sets the version, validates and encodes the record.
func (r LBAssignment) Marshal() ([]byte, error) { r.Version = CurrentVersion; return encode(r) }

// DecodeLBAssignment decodes and checks an assignment value.
func DecodeLBAssignment(data []byte) (LBAssignment, error) {
	return decode[LBAssignment]("lbipam assignment", data)
}

// ValidateLBAssignment decodes the value read at key and checks that it
// names the service of its key.
func ValidateLBAssignment(key string, value []byte) (LBAssignment, error) {
	ns, name, err := ParseLBIPAMKey(key)
	if err != nil {
		return LBAssignment{}, err
	}
	r, err := DecodeLBAssignment(value)
	if err != nil {
		return LBAssignment{}, err
	}
	if r.Namespace != ns || r.Name != name {
		return LBAssignment{}, malformed("key %q holds the assignment of %s/%s", key, r.Namespace, r.Name)
	}
	return r, nil
}
