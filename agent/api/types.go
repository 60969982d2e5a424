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
	ListEndpoints(ctx context.Context) ([]Endpoint, error)
	Apply(ctx context.Context, yaml []byte) (ApplyResult, error)
	ListObjects(ctx context.Context, kind string) ([]Object, error)
	DeleteObject(ctx context.Context, kind, namespace, name string) error
	Identities(ctx context.Context) ([]Identity, error)
	Status(ctx context.Context) (Status, error)
	// RotateWireGuardKey replaces the node's WireGuard key and publishes
	// the new public key; it returns the device's status afterwards.
	RotateWireGuardKey(ctx context.Context) (WireGuardStatus, error)
}

// EndpointRequest asks the agent to plumb a pod.
type EndpointRequest struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace,omitempty"` // "default" when empty
	Netns     string            `json:"netns"`               // path of the pod's network namespace
	Labels    map[string]string `json:"labels,omitempty"`
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
}

// WireGuardStatus is the node's WireGuard device and its peers.
type WireGuardStatus struct {
	Device     string `json:"device"`
	Mode       string `json:"mode"` // "kernel" or "userspace"
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
