package api

import (
	"context"
	"encoding/json"
	"net/netip"
	"time"
)

// Backend is what the server serves; the agent implements it. Errors built
// with Errorf (or wrapped by WithStatus) choose the HTTP status; anything else
// is a 500.
type Backend interface {
	AddEndpoint(ctx context.Context, req EndpointRequest) (Endpoint, error)
	DeleteEndpoint(ctx context.Context, namespace, name string) error
	// DeleteEndpointOf deletes the endpoint only when it was added for
	// containerID (the CNI plugin's DEL): an endpoint of another container
	// (a newer sandbox of the pod) is left alone, and that is no error.
	// A missing endpoint is a not-found error, as for DeleteEndpoint.
	DeleteEndpointOf(ctx context.Context, namespace, name, containerID string) error
	// CollectEndpoints deletes the endpoints added through CNI (with a
	// container ID) whose container ID is not in req.Valid (the CNI GC).
	CollectEndpoints(ctx context.Context, req GCRequest) (GCResult, error)
	ListEndpoints(ctx context.Context) ([]Endpoint, error)
	Apply(ctx context.Context, yaml []byte) (ApplyResult, error)
	ListObjects(ctx context.Context, kind string) ([]Object, error)
	DeleteObject(ctx context.Context, kind, namespace, name string) error
	Identities(ctx context.Context) ([]Identity, error)
	Status(ctx context.Context) (Status, error)
	// RotateWireGuardKey replaces the node's WireGuard key and publishes
	// the new public key; it returns the device's status afterwards.
	RotateWireGuardKey(ctx context.Context) (WireGuardStatus, error)
	// BGP returns the BGP speaker's status (the announced routes too when
	// routes is set); without a BGPPeeringPolicy for the node it is empty.
	BGP(ctx context.Context, routes bool) (BGPStatus, error)
}

// EndpointRequest asks the agent to plumb a pod.
type EndpointRequest struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace,omitempty"` // "default" when empty
	Netns     string            `json:"netns"`               // path of the pod's network namespace
	Labels    map[string]string `json:"labels,omitempty"`

	// Set by the CNI plugin (Kubernetes mode); empty for the CLI.
	//
	// ContainerID is the pod sandbox's: an add for an existing endpoint
	// with the same container ID returns it unchanged (a repeated ADD);
	// with another one it replaces it (the sandbox was recreated).
	ContainerID string `json:"containerID,omitempty"`
	// IfName is the interface name inside the pod (default eth0).
	IfName string `json:"ifName,omitempty"`
	// PodUID is the Kubernetes pod's UID, when known.
	PodUID string `json:"podUID,omitempty"`
}

// GCRequest lists the CNI attachments that are still valid.
type GCRequest struct {
	// Valid holds the container IDs of the attachments to keep.
	Valid []string `json:"valid"`
}

// GCResult lists the endpoints a CNI GC removed.
type GCResult struct {
	Removed []Endpoint `json:"removed"`
	// Errors lists the endpoints that could not be removed, with why.
	Errors []string `json:"errors,omitempty"`
}

// Endpoint is a plumbed pod.
type Endpoint struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels,omitempty"`
	Netns     string            `json:"netns"`
	Interface string            `json:"interface"` // host-side veth
	IfIndex   int               `json:"ifIndex"`
	IPs       []netip.Addr      `json:"ips"`
	Identity  uint32            `json:"identity"`
	ID        uint32            `json:"id"` // node-local endpoint ID
	HostMAC   string            `json:"hostMAC"`
	PodMAC    string            `json:"podMAC"`
	Created   time.Time         `json:"created"`
	// Set for endpoints added through CNI (see EndpointRequest).
	ContainerID string `json:"containerID,omitempty"`
	IfName      string `json:"ifName,omitempty"` // inside the pod; "" is eth0
	PodUID      string `json:"podUID,omitempty"`
	// BigTCP is the GSO/GRO size of the endpoint's veth, once reconciled.
	BigTCP *EndpointBigTCP `json:"bigTCP,omitempty"`
	// AddDuration is how long the add that created the endpoint took in
	// the local API, from the request's arrival to the response (waiting
	// for the pod's labels and the reconcile run that enforces the
	// endpoint included). Kept in memory only: zero (left out) for an
	// endpoint restored by a restarted agent.
	AddDuration time.Duration `json:"addDuration,omitempty"`
}

// ApplyResult lists what an apply did, object by object.
type ApplyResult struct {
	Objects []ObjectResult `json:"objects"`
}

// Actions reported in ObjectResult.
const (
	ActionCreated    = "created"
	ActionConfigured = "configured"
	ActionUnchanged  = "unchanged"
)

// ObjectResult is one applied object and what happened to it.
type ObjectResult struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Action    string `json:"action"`
}

// Object is an applied object: its identity and its full JSON document
// (apiVersion, kind, metadata, spec) as stored by the agent.
type Object struct {
	Kind      string          `json:"kind"`
	Namespace string          `json:"namespace"`
	Name      string          `json:"name"`
	Object    json.RawMessage `json:"object"`
}

// Identity is an allocated security identity.
type Identity struct {
	ID        uint32            `json:"id"`
	Labels    map[string]string `json:"labels"`
	Endpoints int               `json:"endpoints"` // local endpoints that carry it
}

// Status is the node at a glance.
type Status struct {
	Node       string         `json:"node"`
	Cluster    string         `json:"cluster"`
	ClusterID  uint32         `json:"clusterID"`
	PodCIDRs   []netip.Prefix `json:"podCIDRs"`
	AttachMode string         `json:"attachMode"` // "tcx", "tc" (clsact), or "" before the first attach
	Started    time.Time      `json:"started"`

	Endpoints       int `json:"endpoints"`
	Services        int `json:"services"`
	NetworkPolicies int `json:"networkPolicies"`
	Identities      int `json:"identities"`

	// What the datapath holds right now.
	Frontends      int `json:"frontends"`
	PolicyEntries  int `json:"policyEntries"`
	IPCacheEntries int `json:"ipcacheEntries"` // after the last reconcile
	// IPCacheOverflow counts the mesh entries left out of a full ipcache.
	IPCacheOverflow int `json:"ipcacheOverflow,omitempty"`
	Conntrack       int `json:"conntrackEntries"`

	Metrics   []Metric        `json:"metrics"`
	Reconcile ReconcileStatus `json:"reconcile"`
	// Errors lists what could not be read for this status.
	Errors []string `json:"errors,omitempty"`
	// ClusterMesh is set in cluster mode (the agent talks to etcd).
	ClusterMesh *ClusterMeshStatus `json:"clustermesh,omitempty"`
	// WireGuard is set when transparent encryption is on.
	WireGuard *WireGuardStatus `json:"wireguard,omitempty"`
	// BigTCP is where packets beyond 64 KiB are on, and why not elsewhere.
	BigTCP *BigTCPStatus `json:"bigTCP,omitempty"`
	// Kubernetes is set in Kubernetes mode.
	Kubernetes *KubernetesStatus `json:"kubernetes,omitempty"`
	// BGP is set when a BGPPeeringPolicy selects the node.
	BGP *BGPStatus `json:"bgp,omitempty"`
	// NorthSouth is the way in from outside the mesh.
	NorthSouth *NorthSouthStatus `json:"northSouth,omitempty"`
	// L2 is the node's L2 announcements (ARP/NDP for service addresses).
	L2 *L2Status `json:"l2,omitempty"`
}

// L2Status is what the node knows about L2 announcements: the addresses
// its policies select, who leads each, and what this node answered.
type L2Status struct {
	// Mode is "cluster" (leadership from an etcd lease and heartbeats
	// among the candidates) or "standalone" (this node leads everything
	// its policies select).
	Mode string `json:"mode"`
	// LeaseHeld: cluster mode, this node holds its L2 lease and its record
	// is written; without it the node answers nothing.
	LeaseHeld bool   `json:"leaseHeld"`
	LeaseErr  string `json:"leaseError,omitempty"`
	// Members are the nodes this node counts as alive candidates, itself
	// included when it may lead.
	Members     []string         `json:"members"`
	Addresses   []L2Address      `json:"addresses"`
	Policies    []L2PolicyStatus `json:"policies"`
	Leaderships int              `json:"leaderships"` // addresses this node leads now
	Takeovers   uint64           `json:"takeovers"`   // addresses this node started to lead
	ARPReplies  uint64           `json:"arpReplies"`
	NAReplies   uint64           `json:"naReplies"`
	Gratuitous  uint64           `json:"gratuitous"` // gratuitous ARPs and unsolicited NAs
	Heartbeat   string           `json:"heartbeat,omitempty"`
	// RejectedHeartbeats counts heartbeats from a peer's address whose
	// signature or sequence number did not verify (forged or replayed).
	RejectedHeartbeats uint64   `json:"rejectedHeartbeats,omitempty"`
	Errors             []string `json:"errors,omitempty"`
}

// L2Address is one announced address.
type L2Address struct {
	Address string `json:"address"`
	Service string `json:"service"`
	Policy  string `json:"policy"`
	// Leader is the node that answers ("" when no node is eligible).
	Leader     string `json:"leader"`
	Candidates int    `json:"candidates"`
	// Interfaces and Since are set when this node leads.
	Interfaces []string   `json:"interfaces,omitempty"`
	Since      *time.Time `json:"since,omitempty"`
}

// L2PolicyStatus is one policy on this node.
type L2PolicyStatus struct {
	Name       string   `json:"name"`
	Selected   bool     `json:"nodeSelected"` // the node selector matches this node
	Interfaces []string `json:"interfaces,omitempty"`
	Services   int      `json:"services"`
	Addresses  int      `json:"addresses"`
	// Problem says why the policy announces nothing from this node (an
	// interface pattern matching no interface, a selector matching no
	// service); it changes nothing else.
	Problem string `json:"problem,omitempty"`
}

// KubernetesStatus is the agent's view of the API server (Kubernetes
// mode).
type KubernetesStatus struct {
	// Synced: every informer has listed once; until then the objects the
	// previous run persisted are served.
	Synced bool `json:"synced"`
	// Objects are the Services and NetworkPolicies translated for the
	// datapath; Refused those left out because they cannot be enforced as
	// written (each logged once), now.
	Objects int `json:"objects"`
	Refused int `json:"refused"`
	// Translations and Refusals count since the agent started.
	Translations uint64 `json:"translations"`
	Refusals     uint64 `json:"refusals"`
}

// BigTCPStatus is the node's BIG TCP: the settings, every path a pod's
// traffic takes with whether it carries GSO/GRO packets beyond 64 KiB per
// family (and why not), and the devices behind that.
type BigTCPStatus struct {
	IPv6 string `json:"ipv6"` // off, on or auto, as configured
	IPv4 string `json:"ipv4"`
	Size int    `json:"size"` // requested GSO/GRO size
	// IPv4Supported: the kernel has the IPv4 attributes (Linux >= 6.3).
	IPv4Supported bool             `json:"ipv4Supported"`
	Paths         []BigTCPPath     `json:"paths"`
	Devices       []BigTCPDevice   `json:"devices"`
	Endpoints     []EndpointBigTCP `json:"endpoints,omitempty"`
	LastError     string           `json:"lastError,omitempty"`
}

// Paths of BigTCPPath.Path.
const (
	BigTCPPathSameNode  = "same-node"
	BigTCPPathCrossNode = "cross-node"           // to other nodes in the clear
	BigTCPPathWireGuard = "cross-node-wireguard" // to other nodes through WireGuard
	BigTCPPathOutside   = "outside"              // through the default route
)

// BigTCPPath is one path for one family.
type BigTCPPath struct {
	Path   string `json:"path"`
	Family string `json:"family"` // "ipv6" or "ipv4"
	On     bool   `json:"on"`
	// Reason says why the path is off (or which devices on it are not
	// on); empty when every device on it carries the size.
	Reason string `json:"reason,omitempty"`
}

// BigTCPDevice is one device the agent sizes: its limits and the sizes
// it holds now.
type BigTCPDevice struct {
	Name     string `json:"name"`
	Role     string `json:"role"`               // underlay, outside, wireguard, pod-host, pod
	Endpoint string `json:"endpoint,omitempty"` // <namespace>/<name> for pod veths
	TSOMax   uint32 `json:"tsoMaxSize"`
	GSO      uint32 `json:"gsoMaxSize"`
	GRO      uint32 `json:"groMaxSize"`
	GSOIPv4  uint32 `json:"gsoIPv4MaxSize"`
	GROIPv4  uint32 `json:"groIPv4MaxSize"`
	// Reason says why the device holds 65536 for a family that is on:
	// its TSO limit, or the error of a write that was rolled back.
	Reason string `json:"reason,omitempty"`
}

// EndpointBigTCP is BIG TCP on one endpoint's veth (both ends).
type EndpointBigTCP struct {
	Endpoint string `json:"endpoint"` // <namespace>/<name>
	IPv6     uint32 `json:"ipv6"`     // GSO/GRO size both ends carry
	IPv4     uint32 `json:"ipv4"`
	Reason   string `json:"reason,omitempty"`
}

// WireGuardStatus is the node's WireGuard device and its peers.
type WireGuardStatus struct {
	Device     string `json:"device"`
	Mode       string `json:"mode"` // "kernel", "userspace" (embedded) or "userspace-daemon" (isthmus-agent wireguard-daemon's)
	PublicKey  string `json:"publicKey"`
	ListenPort int    `json:"listenPort"`
	MTU        int    `json:"mtu"`
	// NodeEncryption: node-to-node traffic is encrypted too, not only pods'.
	NodeEncryption bool            `json:"nodeEncryption"`
	Peers          []WireGuardPeer `json:"peers"`
	// Unencrypted names mesh nodes that publish no WireGuard key: traffic to
	// their pods is not sent (see docs/encryption.md).
	Unencrypted []string `json:"unencrypted,omitempty"`
	// Refused names peers left out, with why (a duplicate key, bad record).
	Refused   []string `json:"refused,omitempty"`
	LastError string   `json:"lastError,omitempty"`
}

// WireGuardPeer is one peer as the device sees it.
type WireGuardPeer struct {
	Node          string         `json:"node"` // <cluster>/<node>
	PublicKey     string         `json:"publicKey"`
	Endpoint      string         `json:"endpoint,omitempty"`
	AllowedIPs    []netip.Prefix `json:"allowedIPs"`
	LastHandshake time.Time      `json:"lastHandshake,omitzero"`
	RxBytes       int64          `json:"rxBytes"`
	TxBytes       int64          `json:"txBytes"`
}

// ClusterMeshStatus is the node's view of its cluster's etcd and of the
// mesh it reads from there.
type ClusterMeshStatus struct {
	KVStoreEndpoints []string     `json:"kvstoreEndpoints"`
	Connected        bool         `json:"connected"`
	LastError        string       `json:"lastError,omitempty"`
	NodeIPs          []netip.Addr `json:"nodeIPs"`
	// Published: every record of this node (node, ipcache) is in etcd.
	Published        bool `json:"published"`
	PublishedRecords int  `json:"publishedRecords"`
	// RouteError says why routes to other nodes' pod CIDRs are not all in
	// place (empty when they are).
	RouteError string `json:"routeError,omitempty"`
	// InvalidRecords counts records read from etcd that were skipped.
	InvalidRecords uint64           `json:"invalidRecords"`
	LastInvalid    string           `json:"lastInvalid,omitempty"`
	Clusters       []ClusterSummary `json:"clusters"`
}

// ClusterSummary is one cluster of the mesh, own or remote.
type ClusterSummary struct {
	Name  string `json:"name"`
	ID    uint32 `json:"id"`
	Local bool   `json:"local"`
	// Synced: the own cluster's state was listed completely; a remote
	// cluster's canaries are all present and its state is in use.
	Synced         bool   `json:"synced"`
	Error          string `json:"error,omitempty"`
	Nodes          int    `json:"nodes"`
	Endpoints      int    `json:"endpoints"`
	Identities     int    `json:"identities"`
	Services       int    `json:"services"`
	InvalidRecords uint64 `json:"invalidRecords"`
	// Refused counts the cluster's records refused now as not owned by it
	// (a reserved identity, a prefix outside its pod CIDRs, ...), by
	// reason; RefusedTotal the refusals since the agent started.
	Refused      map[string]int    `json:"refused,omitempty"`
	RefusedTotal map[string]uint64 `json:"refusedTotal,omitempty"`
}

// Metric is one datapath counter.
type Metric struct {
	Reason  string `json:"reason"`
	Drop    bool   `json:"drop"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// ReconcileStatus says whether the kernel matches the desired state.
type ReconcileStatus struct {
	Runs        uint64    `json:"runs"`
	LastSuccess time.Time `json:"lastSuccess,omitzero"`
	LastError   string    `json:"lastError,omitempty"` // empty when the last run succeeded
}

// NorthSouthStatus is the way into the mesh from outside
// (gateway/northsouth): the external devices the programs are attached
// to, and the SNAT table of externalTrafficPolicy Cluster.
type NorthSouthStatus struct {
	// Configured are the devices named by --external-devices (empty:
	// found from the node IPs and the default routes).
	Configured []string           `json:"configured,omitempty"`
	Devices    []NorthSouthDevice `json:"devices"`
	// Table is the nftables table (family inet) that masquerades flows
	// under Cluster; it exists while SNATWanted.
	Table       string `json:"table"`
	SNATWanted  bool   `json:"snatWanted"`
	SNATPresent bool   `json:"snatPresent"`
	SNATError   string `json:"snatError,omitempty"`
	// Frontends counts the isth_lb frontends by policy after the last
	// reconcile, Addresses the known external addresses.
	FrontendsCluster int    `json:"frontendsCluster"`
	FrontendsLocal   int    `json:"frontendsLocal"`
	Addresses        int    `json:"addresses"`
	Error            string `json:"error,omitempty"`
}

// NorthSouthDevice is one external device.
type NorthSouthDevice struct {
	Name     string   `json:"name"`
	Index    int      `json:"index"`
	Roles    []string `json:"roles"` // underlay, outside, configured
	Attached bool     `json:"attached"`
	// Reason says why the programs are not attached.
	Reason string `json:"reason,omitempty"`
}
