package records

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"net/netip"
	"slices"
	"time"
)

// CurrentVersion is the "version" every record is written with and the
// only one this build reads. A change that old readers would misread bumps
// it (and readers learn both); adding a field is such a change too, since
// decoders reject unknown fields.
const CurrentVersion = 1

// MaxRecordSize bounds a record's encoded size; etcd refuses requests over
// 1.5 MiB anyway, and a decoder should not chew on more.
const MaxRecordSize = 1 << 20

// Capabilities a cluster announces in its ClusterConfig. Unknown ones are
// accepted (and ignored), so a newer server can announce more without
// bumping the version.
const (
	// CapSyncCanaries: the cluster writes isthmus/synced/... canaries.
	CapSyncCanaries = "sync-canaries"
	// CapMirror: the cluster's server mirrors remote clusters under
	// isthmus/cache/...
	CapMirror = "mirror"
)

// ClusterConfig is stored at isthmus/cluster-config/<cluster>.
type ClusterConfig struct {
	Version      int            `json:"version"`
	Name         string         `json:"name"`
	ID           uint32         `json:"id"`
	PodCIDRs     []netip.Prefix `json:"podCIDRs"`
	Capabilities []string       `json:"capabilities,omitempty"`
}

// LabelExternalWorkload marks the node record of an external workload (a
// VM or bare-metal host, isthmus-agent --join): its peers keep its
// WireGuard tunnel alive, since such hosts often sit behind NAT.
const LabelExternalWorkload = "isthmus.io/external-workload"

// Node is stored at isthmus/state/nodes/v1/<cluster>/<node>.
type Node struct {
	Version   int    `json:"version"`
	Name      string `json:"name"`
	Cluster   string `json:"cluster"`
	ClusterID uint32 `json:"clusterID"`
	// IPs are the node's underlay addresses, at least one.
	IPs      []netip.Addr   `json:"ips"`
	PodCIDRs []netip.Prefix `json:"podCIDRs,omitempty"`
	// WireGuardPublicKey is base64 of a 32-byte key (as wg(8) prints it).
	WireGuardPublicKey string `json:"wireguardPublicKey,omitempty"`
	// WireGuardPort is the UDP port of the node's WireGuard device; zero
	// (with a key) means the default, 51871.
	WireGuardPort int `json:"wireguardPort,omitempty"`
	// BootID changes when the node reboots: peers reset state tied to it.
	BootID string            `json:"bootID,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// IPCacheEntry is stored at isthmus/state/ip/v1/<cluster>/<ip>: which
// identity an address or prefix has and which node hosts it.
type IPCacheEntry struct {
	Version  int          `json:"version"`
	Prefix   netip.Prefix `json:"prefix"`
	Identity uint32       `json:"identity"`
	// HostIP is the underlay address of the node that hosts the endpoint;
	// zero for entries not behind a node (e.g. world CIDRs).
	HostIP         netip.Addr `json:"hostIP,omitzero"`
	OwnerName      string     `json:"ownerName,omitempty"`
	OwnerNamespace string     `json:"ownerNamespace,omitempty"`
	Cluster        string     `json:"cluster"`
}

// Protocols of service ports.
const (
	ProtocolTCP = "TCP"
	ProtocolUDP = "UDP"
)

// Affinity of a global service: which backends clients prefer.
type Affinity string

const (
	AffinityNone   Affinity = "none" // all backends alike (also "")
	AffinityLocal  Affinity = "local"
	AffinityRemote Affinity = "remote"
)

// ServiceRecord is stored at isthmus/state/services/v1/<cluster>/<ns>/<name>.
type ServiceRecord struct {
	Version   int        `json:"version"`
	Name      string     `json:"name"`
	Namespace string     `json:"namespace"`
	Cluster   string     `json:"cluster"`
	ClusterID uint32     `json:"clusterID"`
	Frontends []Frontend `json:"frontends"`
	Backends  []Backend  `json:"backends,omitempty"`
	// Global services merge backends of every cluster that has them.
	Global bool `json:"global,omitempty"`
	// Shared: this cluster's backends are offered to other clusters.
	Shared   bool     `json:"shared,omitempty"`
	Affinity Affinity `json:"affinity,omitempty"`
}

// Frontend is one address and port a service listens on.
type Frontend struct {
	IP       netip.Addr `json:"ip"`
	Port     uint16     `json:"port"`
	Protocol string     `json:"protocol"`
	PortName string     `json:"portName,omitempty"`
}

// Backend is one address and port a service sends to; PortName and
// Protocol match it to frontends.
type Backend struct {
	IP       netip.Addr `json:"ip"`
	Port     uint16     `json:"port"`
	Protocol string     `json:"protocol"`
	PortName string     `json:"portName,omitempty"`
	Cluster  string     `json:"cluster"`
}

// IdentityRecord is the master key isthmus/state/identities/v1/id/<id>.
type IdentityRecord struct {
	Version int               `json:"version"`
	ID      uint32            `json:"id"`
	Labels  map[string]string `json:"labels"`
}

// IdentityRef is the value of a node's reference
// (.../value/<labels>/<node>) and of a label claim (.../labels/<labels>).
type IdentityRef struct {
	Version int    `json:"version"`
	ID      uint32 `json:"id"`
}

// Stamp is the value of heartbeat and sync canary keys.
type Stamp struct {
	Version int       `json:"version"`
	Cluster string    `json:"cluster"`
	Time    time.Time `json:"time"`
}

// ---- intrinsic validation ----

// Validate checks the config on its own.
func (c ClusterConfig) Validate() error {
	if err := checkVersion(c.Version); err != nil {
		return err
	}
	if err := ValidateClusterName(c.Name); err != nil {
		return err
	}
	if err := ValidateClusterID(c.ID); err != nil {
		return err
	}
	if err := validateCIDRs("podCIDRs", c.PodCIDRs); err != nil {
		return err
	}
	for i, cp := range c.Capabilities {
		if err := validateName(fmt.Sprintf("capabilities[%d]", i), cp); err != nil {
			return err
		}
	}
	return nil
}

// Validate checks the node on its own.
func (n Node) Validate() error {
	if err := checkVersion(n.Version); err != nil {
		return err
	}
	if err := ValidateNodeName(n.Name); err != nil {
		return err
	}
	if err := ValidateClusterName(n.Cluster); err != nil {
		return err
	}
	if err := ValidateClusterID(n.ClusterID); err != nil {
		return err
	}
	if len(n.IPs) == 0 {
		return malformed("node %s: no IPs", n.Name)
	}
	for i, a := range n.IPs {
		if err := validateAddr(fmt.Sprintf("ips[%d]", i), a); err != nil {
			return err
		}
	}
	if err := validateCIDRs("podCIDRs", n.PodCIDRs); err != nil {
		return err
	}
	if n.WireGuardPublicKey != "" {
		k, err := base64.StdEncoding.Strict().DecodeString(n.WireGuardPublicKey)
		if err != nil || len(k) != 32 {
			return malformed("node %s: wireguardPublicKey must be base64 of 32 bytes", n.Name)
		}
	}
	if n.WireGuardPort < 0 || n.WireGuardPort > 65535 {
		return malformed("node %s: wireguardPort %d out of range 1-65535", n.Name, n.WireGuardPort)
	}
	if len(n.BootID) > 64 {
		return malformed("node %s: bootID longer than 64 characters", n.Name)
	}
	for _, r := range n.BootID {
		if r < 0x21 || r > 0x7e {
			return malformed("node %s: bootID must be printable ASCII without spaces", n.Name)
		}
	}
	return ValidateLabels(n.Labels)
}

// Validate checks the entry on its own.
func (e IPCacheEntry) Validate() error {
	if err := checkVersion(e.Version); err != nil {
		return err
	}
	if err := validatePrefix("prefix", e.Prefix); err != nil {
		return err
	}
	if err := validateIdentity(e.Identity); err != nil {
		return err
	}
	if e.HostIP.IsValid() {
		if err := validateAddr("hostIP", e.HostIP); err != nil {
			return err
		}
	}
	if e.OwnerName != "" {
		if err := validateSubdomain(e.OwnerName); err != nil {
			return malformed("ownerName %q: %v", e.OwnerName, err)
		}
	}
	if e.OwnerNamespace != "" {
		if err := validateName("ownerNamespace", e.OwnerNamespace); err != nil {
			return err
		}
	}
	return ValidateClusterName(e.Cluster)
}

func validateProtocol(what, p string) error {
	if p != ProtocolTCP && p != ProtocolUDP {
		return malformed("%s: protocol must be %s or %s, got %q", what, ProtocolTCP, ProtocolUDP, p)
	}
	return nil
}

func validatePortName(what, s string) error {
	if s != "" {
		return validateName(what+" portName", s)
	}
	return nil
}

// Validate checks the service on its own.
func (s ServiceRecord) Validate() error {
	if err := checkVersion(s.Version); err != nil {
		return err
	}
	if err := validateName("service name", s.Name); err != nil {
		return err
	}
	if err := validateName("namespace", s.Namespace); err != nil {
		return err
	}
	if err := ValidateClusterName(s.Cluster); err != nil {
		return err
	}
	if err := ValidateClusterID(s.ClusterID); err != nil {
		return err
	}
	if len(s.Frontends) == 0 {
		return malformed("service %s/%s: no frontends", s.Namespace, s.Name)
	}
	type portKey struct{ proto, name string }
	ports := map[portKey]bool{}
	seen := map[Frontend]bool{}
	for i, f := range s.Frontends {
		what := fmt.Sprintf("frontends[%d]", i)
		if err := validateAddr(what, f.IP); err != nil {
			return err
		}
		if f.Port == 0 {
			return malformed("%s: port must be 1-65535", what)
		}
		if err := validateProtocol(what, f.Protocol); err != nil {
			return err
		}
		if err := validatePortName(what, f.PortName); err != nil {
			return err
		}
		if seen[f] {
			return malformed("%s: %s %s:%d listed twice", what, f.Protocol, f.IP, f.Port)
		}
		seen[f] = true
		ports[portKey{f.Protocol, f.PortName}] = true
	}
	seenB := map[Backend]bool{}
	for i, b := range s.Backends {
		what := fmt.Sprintf("backends[%d]", i)
		if err := validateAddr(what, b.IP); err != nil {
			return err
		}
		if b.Port == 0 {
			return malformed("%s: port must be 1-65535", what)
		}
		if err := validateProtocol(what, b.Protocol); err != nil {
			return err
		}
		if err := validatePortName(what, b.PortName); err != nil {
			return err
		}
		if !ports[portKey{b.Protocol, b.PortName}] {
			return malformed("%s: no frontend has protocol %s and port name %q", what, b.Protocol, b.PortName)
		}
		// A cluster publishes only its own backends; the merged view of a
		// global service is computed by the reader.
		if b.Cluster != s.Cluster {
			return mismatch("%s: backend of cluster %q in a service of cluster %q", what, b.Cluster, s.Cluster)
		}
		if seenB[b] {
			return malformed("%s: %s %s:%d listed twice", what, b.Protocol, b.IP, b.Port)
		}
		seenB[b] = true
	}
	switch s.Affinity {
	case "", AffinityNone, AffinityLocal, AffinityRemote:
	default:
		return malformed("affinity must be %s, %s or %s, got %q", AffinityLocal, AffinityRemote, AffinityNone, s.Affinity)
	}
	if !s.Global && (s.Shared || (s.Affinity != "" && s.Affinity != AffinityNone)) {
		return malformed("service %s/%s: shared and affinity apply to global services only", s.Namespace, s.Name)
	}
	return nil
}

// Validate checks the identity record on its own.
func (r IdentityRecord) Validate() error {
	if err := checkVersion(r.Version); err != nil {
		return err
	}
	if err := validateIdentity(r.ID); err != nil {
		return err
	}
	if r.ID <= MaxReservedIdentity {
		return malformed("identity %d is reserved and never stored", r.ID)
	}
	if len(r.Labels) == 0 {
		return malformed("identity %d: no labels", r.ID)
	}
	return ValidateLabels(r.Labels)
}

// Validate checks the reference on its own.
func (r IdentityRef) Validate() error {
	if err := checkVersion(r.Version); err != nil {
		return err
	}
	if err := validateIdentity(r.ID); err != nil {
		return err
	}
	if r.ID <= MaxReservedIdentity {
		return malformed("identity %d is reserved and never stored", r.ID)
	}
	return nil
}

// Validate checks the stamp on its own.
func (s Stamp) Validate() error {
	if err := checkVersion(s.Version); err != nil {
		return err
	}
	if s.Time.IsZero() {
		return malformed("time missing")
	}
	return ValidateClusterName(s.Cluster)
}

func checkVersion(v int) error {
	if v != CurrentVersion {
		return malformed("version %d not supported (this build reads version %d)", v, CurrentVersion)
	}
	return nil
}

// ---- encoding ----

// validator is any record type of this package.
type validator interface{ Validate() error }

// encode validates r and returns its JSON.
func encode(r validator) ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// Marshal sets the version, validates and encodes the record. The Marshal
// methods below are the only way records are written, so nothing invalid
// ever reaches etcd from this code.
func (c ClusterConfig) Marshal() ([]byte, error) { c.Version = CurrentVersion; return encode(c) }

// Marshal sets the version, validates and encodes the record.
func (n Node) Marshal() ([]byte, error) { n.Version = CurrentVersion; return encode(n) }

// Marshal sets the version, validates and encodes the record.
func (e IPCacheEntry) Marshal() ([]byte, error) { e.Version = CurrentVersion; return encode(e) }

// Marshal sets the version, validates and encodes the record.
func (s ServiceRecord) Marshal() ([]byte, error) { s.Version = CurrentVersion; return encode(s) }

// Marshal sets the version, validates and encodes the record.
func (r IdentityRecord) Marshal() ([]byte, error) { r.Version = CurrentVersion; return encode(r) }

// Marshal sets the version, validates and encodes the record.
func (r IdentityRef) Marshal() ([]byte, error) { r.Version = CurrentVersion; return encode(r) }

// Marshal sets the version, validates and encodes the record.
func (s Stamp) Marshal() ([]byte, error) { s.Version = CurrentVersion; return encode(s) }

// decode is the strict decoder every Decode function uses: size limit,
// version read first (so a record from a newer writer says so instead of
// "unknown field"), then unknown fields rejected, one JSON value only,
// then the record's own Validate. A canonical value takes a shorter way
// to the same result.
func decode[T validator](what string, data []byte) (T, error) {
	var zero T
	if len(data) > MaxRecordSize {
		return zero, malformed("%s: %d bytes, more than %d", what, len(data), MaxRecordSize)
	}
	if v, ok := decodeCanonical[T](data); ok {
		return v, nil
	}
	return decodeStrict[T](what, data)
}

// decodeStrict is decode without the fast path.
func decodeStrict[T validator](what string, data []byte) (T, error) {
	var zero, v T
	var hdr struct {
		Version *int `json:"version"`
	}
	if err := json.Unmarshal(data, &hdr); err != nil {
		return zero, malformed("%s: %v", what, err)
	}
	if hdr.Version == nil {
		return zero, malformed("%s: no version field", what)
	}
	if err := checkVersion(*hdr.Version); err != nil {
		return zero, fmt.Errorf("%s: %w", what, err)
	}
	if err := strictjson.Decode(data, &v); err != nil {
		return zero, malformed("%s: %v", what, err)
	}
	if err := v.Validate(); err != nil {
		return zero, fmt.Errorf("%s: %w", what, err)
	}
	return v, nil
}

// decodeCanonical is decode's fast path for a value that is exactly what
// Marshal writes (nearly every value in etcd): decoded into T at once and
// taken only if encoding the result gives the value back byte for byte,
// which rules out what the strict path refuses (unknown, duplicate or
// differently cased fields, trailing data; the version field is always
// written) and gives what it gives. A record that does not validate is
// left to the strict path and its errors. The agents read every
// LB-IPAM assignment and service record of their cluster through here,
// ten thousand of each in a bulk apply.
func decodeCanonical[T validator](data []byte) (T, bool) {
	var v, zero T
	if json.Unmarshal(data, &v) != nil {
		return zero, false
	}
	if enc, err := json.Marshal(v); err != nil || !bytes.Equal(enc, data) || v.Validate() != nil {
		return zero, false
	}
	return v, true
}

// DecodeClusterConfig decodes and checks a cluster config value.
func DecodeClusterConfig(data []byte) (ClusterConfig, error) {
	return decode[ClusterConfig]("cluster config", data)
}

// DecodeNode decodes and checks a node value.
func DecodeNode(data []byte) (Node, error) { return decode[Node]("node", data) }

// DecodeIPCacheEntry decodes and checks an ipcache value.
func DecodeIPCacheEntry(data []byte) (IPCacheEntry, error) {
	// The canonical encoding (what Marshal writes) is read directly; any
	// other goes through the strict decoder. Both give the same result
	// (canonical.go).
	if len(data) <= MaxRecordSize {
		if e, ok := decodeIPCacheCanonical(data); ok {
			if err := e.Validate(); err != nil {
				return IPCacheEntry{}, fmt.Errorf("ipcache entry: %w", err)
			}
			return e, nil
		}
	}
	return decode[IPCacheEntry]("ipcache entry", data)
}

// DecodeService decodes and checks a service value.
func DecodeService(data []byte) (ServiceRecord, error) {
	return decode[ServiceRecord]("service", data)
}

// DecodeIdentity decodes and checks an identity master value.
func DecodeIdentity(data []byte) (IdentityRecord, error) {
	return decode[IdentityRecord]("identity", data)
}

// DecodeIdentityRef decodes and checks an identity reference or claim.
func DecodeIdentityRef(data []byte) (IdentityRef, error) {
	return decode[IdentityRef]("identity reference", data)
}

// DecodeStamp decodes and checks a heartbeat or sync canary value.
func DecodeStamp(data []byte) (Stamp, error) { return decode[Stamp]("stamp", data) }

// ---- validation against key and connection ----

// checkSource checks that expectedCluster/expectedID (the cluster the
// connection belongs to) are set and agree with what the record says.
func checkSource(key, cluster string, id uint32, expectedCluster string, expectedID uint32) error {
	if expectedCluster == "" || expectedID == 0 {
		return fmt.Errorf("validate %s: expected cluster name and ID must be given", key)
	}
	if cluster != expectedCluster {
		return mismatch("%s: record of cluster %q read from cluster %q", key, cluster, expectedCluster)
	}
	if id != 0 && id != expectedID {
		return mismatch("%s: record says cluster ID %d, cluster %q has ID %d", key, id, expectedCluster, expectedID)
	}
	return nil
}

// ValidateClusterConfig decodes value read at key from the etcd of cluster
// expectedCluster (ID expectedID) and checks that all three agree.
func ValidateClusterConfig(key string, value []byte, expectedCluster string, expectedID uint32) (ClusterConfig, error) {
	keyCluster, err := ParseClusterConfigKey(key)
	if err != nil {
		return ClusterConfig{}, err
	}
	c, err := DecodeClusterConfig(value)
	if err != nil {
		return ClusterConfig{}, fmt.Errorf("%s: %w", key, err)
	}
	if c.Name != keyCluster {
		return ClusterConfig{}, mismatch("%s: record names cluster %q", key, c.Name)
	}
	return c, checkSource(key, c.Name, c.ID, expectedCluster, expectedID)
}

// ValidateNode decodes value read at key from cluster expectedCluster and
// checks that record, key and connection agree.
func ValidateNode(key string, value []byte, expectedCluster string, expectedID uint32) (Node, error) {
	keyCluster, keyNode, err := ParseNodeKey(key)
	if err != nil {
		return Node{}, err
	}
	n, err := DecodeNode(value)
	if err != nil {
		return Node{}, fmt.Errorf("%s: %w", key, err)
	}
	if n.Cluster != keyCluster {
		return Node{}, mismatch("%s: record names cluster %q", key, n.Cluster)
	}
	if n.Name != keyNode {
		return Node{}, malformed("%s: record names node %q", key, n.Name)
	}
	return n, checkSource(key, n.Cluster, n.ClusterID, expectedCluster, expectedID)
}

// ValidateIPCacheEntry decodes value read at key from cluster
// expectedCluster and checks that record, key and connection agree; a
// cluster-scoped identity must belong to expectedID.
func ValidateIPCacheEntry(key string, value []byte, expectedCluster string, expectedID uint32) (IPCacheEntry, error) {
	keyCluster, _, keyPrefix, err := ParseIPCacheKey(key)
	if err != nil {
		return IPCacheEntry{}, err
	}
	e, err := DecodeIPCacheEntry(value)
	if err != nil {
		return IPCacheEntry{}, fmt.Errorf("%s: %w", key, err)
	}
	if e.Cluster != keyCluster {
		return IPCacheEntry{}, mismatch("%s: record names cluster %q", key, e.Cluster)
	}
	if e.Prefix != keyPrefix {
		return IPCacheEntry{}, malformed("%s: record is for prefix %s", key, e.Prefix)
	}
	if err := checkSource(key, e.Cluster, 0, expectedCluster, expectedID); err != nil {
		return IPCacheEntry{}, err
	}
	if e.Identity > MaxReservedIdentity && e.Identity>>identityLocalBits != expectedID {
		return IPCacheEntry{}, mismatch("%s: identity %d belongs to cluster ID %d, not %d", key, e.Identity, e.Identity>>identityLocalBits, expectedID)
	}
	return e, nil
}

// ValidateService decodes value read at key from cluster expectedCluster
// and checks that record, key and connection agree.
func ValidateService(key string, value []byte, expectedCluster string, expectedID uint32) (ServiceRecord, error) {
	keyCluster, ns, name, err := ParseServiceKey(key)
	if err != nil {
		return ServiceRecord{}, err
	}
	s, err := DecodeService(value)
	if err != nil {
		return ServiceRecord{}, fmt.Errorf("%s: %w", key, err)
	}
	if s.Cluster != keyCluster {
		return ServiceRecord{}, mismatch("%s: record names cluster %q", key, s.Cluster)
	}
	if s.Namespace != ns || s.Name != name {
		return ServiceRecord{}, malformed("%s: record is for service %s/%s", key, s.Namespace, s.Name)
	}
	return s, checkSource(key, s.Cluster, s.ClusterID, expectedCluster, expectedID)
}

// ValidateIdentity decodes an identity master read at key from cluster
// expectedCluster: the ID must match the key and belong to expectedID, and
// an isthmus.io/cluster label, if present, must name expectedCluster.
func ValidateIdentity(key string, value []byte, expectedCluster string, expectedID uint32) (IdentityRecord, error) {
	keyID, err := ParseIdentityIDKey(key)
	if err != nil {
		return IdentityRecord{}, err
	}
	r, err := DecodeIdentity(value)
	if err != nil {
		return IdentityRecord{}, fmt.Errorf("%s: %w", key, err)
	}
	if r.ID != keyID {
		return IdentityRecord{}, malformed("%s: record is for identity %d", key, r.ID)
	}
	cluster := expectedCluster
	if c, ok := r.Labels[LabelCluster]; ok {
		cluster = c
	}
	if err := checkSource(key, cluster, r.ID>>identityLocalBits, expectedCluster, expectedID); err != nil {
		return IdentityRecord{}, err
	}
	return r, nil
}

// LabelCluster is the label naming a workload's cluster (identity.LabelCluster).
const LabelCluster = "isthmus.io/cluster"

// CheckClusterConflicts reports why two clusters cannot be in one mesh: the
// same name, the same ID, or overlapping pod CIDRs.
func CheckClusterConflicts(a, b ClusterConfig) error {
	if a.Name == b.Name {
		return fmt.Errorf("clusters conflict: both are named %q", a.Name)
	}
	if a.ID == b.ID {
		return fmt.Errorf("clusters conflict: %q and %q both have cluster ID %d", a.Name, b.Name, a.ID)
	}
	for _, p := range a.PodCIDRs {
		if i := slices.IndexFunc(b.PodCIDRs, p.Overlaps); i >= 0 {
			return fmt.Errorf("clusters conflict: pod CIDR %s of %q overlaps %s of %q", p, a.Name, b.PodCIDRs[i], b.Name)
		}
	}
	return nil
}
