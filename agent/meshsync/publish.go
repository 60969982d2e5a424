package meshsync

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// NodeInfo is what a node publishes about itself.
type NodeInfo struct {
	Local
	IPs      []netip.Addr // underlay addresses
	PodCIDRs []netip.Prefix
	BootID   string
	// WireGuardPublicKey and WireGuardPort are set when the node encrypts.
	WireGuardPublicKey string
	WireGuardPort      int
	// Labels of the node record (records.LabelExternalWorkload on an
	// external workload's).
	Labels map[string]string
}

// Endpoint is a local endpoint as published in the ipcache.
type Endpoint struct {
	Name, Namespace string
	IPs             []netip.Addr
	Identity        uint32
}

// Records returns the keys and values a node publishes: its node record
// and one ipcache entry per endpoint address, whose host IP is the node's
// address of the same family (the other family's when it has none).
func Records(n NodeInfo, eps []Endpoint) (map[string][]byte, error) {
	out := map[string][]byte{}
	node, err := records.Node{Name: n.Node, Cluster: n.Cluster, ClusterID: n.ClusterID,
		IPs: n.IPs, PodCIDRs: n.PodCIDRs, BootID: n.BootID,
		WireGuardPublicKey: n.WireGuardPublicKey, WireGuardPort: n.WireGuardPort, Labels: n.Labels}.Marshal()
	if err != nil {
		return nil, fmt.Errorf("node record: %w", err)
	}
	out[records.NodeKey(n.Cluster, n.Node)] = node
	for _, ep := range eps {
		for _, ip := range ep.IPs {
			p := netip.PrefixFrom(ip, ip.BitLen())
			v, err := records.IPCacheEntry{Prefix: p, Identity: ep.Identity, HostIP: HostIPFor(n.IPs, ip),
				OwnerName: ep.Name, OwnerNamespace: ep.Namespace, Cluster: n.Cluster}.Marshal()
			if err != nil {
				return nil, fmt.Errorf("ipcache record of %s/%s: %w", ep.Namespace, ep.Name, err)
			}
			out[records.IPCacheKey(n.Cluster, n.Node, p)] = v
		}
	}
	return out, nil
}

// HostIPFor picks the node address that hosts ip: the first of the same
// family, else the first one.
func HostIPFor(nodeIPs []netip.Addr, ip netip.Addr) netip.Addr {
	for _, a := range nodeIPs {
		if a.Is4() == ip.Is4() {
			return a
		}
	}
	if len(nodeIPs) > 0 {
		return nodeIPs[0]
	}
	return netip.Addr{}
}

// txnBatch bounds the operations of one transaction (etcd's default limit
// is 128).
const txnBatch = 64

// Publisher keeps a set of leased keys in etcd equal to what it is told
// (Set), like a reconciler: it writes what differs, deletes what it wrote
// that is no longer wanted, retries with backoff, and writes everything
// again when the lease is re-granted (the keys died with the old one).
type Publisher struct {
	c     *kvstore.Client
	lease *kvstore.Lease
	log   *slog.Logger

	trigger chan struct{}

	mu   sync.Mutex
	want map[string][]byte
	// written is what etcd holds from this node as far as we know; a nil
	// value marks a key left by an earlier run or lease that must be
	// written again or deleted.
	written map[string][]byte
	gen     uint64 // bumped when the lease is re-granted
	lastErr error
	synced  bool // the last sync wrote everything
}

// NewPublisher returns a publisher of keys attached to lease.
func NewPublisher(c *kvstore.Client, lease *kvstore.Lease, log *slog.Logger) *Publisher {
	if log == nil {
		log = slog.Default()
	}
	p := &Publisher{c: c, lease: lease, log: log, trigger: make(chan struct{}, 1),
		want: map[string][]byte{}, written: map[string][]byte{}}
	lease.OnRegrant(func(context.Context, kvstore.LeaseID) {
		p.mu.Lock()
		p.gen++
		clear(p.written)
		p.synced = false
		p.mu.Unlock()
		p.log.Warn("clustermesh: lease re-granted; publishing this node's records again")
		p.kick()
	})
	return p
}

func (p *Publisher) kick() {
	select {
	case p.trigger <- struct{}{}:
	default:
	}
}

// Set replaces the wanted keys. The map must not be modified afterwards.
func (p *Publisher) Set(want map[string][]byte) {
	p.mu.Lock()
	p.want = want
	p.synced = false
	p.mu.Unlock()
	p.kick()
}

// AdoptStale finds the ipcache keys of cluster whose host IP is one of
// nodeIPs, left by an earlier run of this node: they are written again if
// still wanted and deleted otherwise, instead of lingering until their old
// lease expires.
func (p *Publisher) AdoptStale(ctx context.Context, cluster string, nodeIPs []netip.Addr) error {
	kvs, _, err := p.c.GetPrefix(ctx, records.StateClusterPrefix(records.KindIP, cluster))
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, kv := range kvs {
		e, err := records.DecodeIPCacheEntry(kv.Value)
		if err != nil || !slices.Contains(nodeIPs, e.HostIP) {
			continue
		}
		if kv.Lease == p.lease.ID() {
			continue // already ours
		}
		if _, ok := p.written[kv.Key]; !ok {
			p.written[kv.Key] = nil
		}
	}
	p.synced = false
	p.kick()
	return nil
}

// ErrNodeNameTaken is ClaimNodeName finding the node's name published by
// another live node.
var ErrNodeNameTaken = errors.New("node name taken")

// ClaimNodeName checks, before a node publishes, that no other node holds
// its name: a node record under the same key, on another lease, with none
// of this node's underlay addresses. Two nodes sharing a name would
// overwrite each other's records and endpoints. The record of this node's
// own earlier run (same addresses) is not a conflict; a record of a node
// that died goes away with its lease, so callers retry.
func ClaimNodeName(ctx context.Context, c *kvstore.Client, local Local, nodeIPs []netip.Addr, lease kvstore.LeaseID) error {
	kv, found, err := c.Get(ctx, records.NodeKey(local.Cluster, local.Node))
	if err != nil || !found || kv.Lease == lease {
		return err
	}
	n, err := records.DecodeNode(kv.Value)
	if err != nil {
		return nil // unreadable: ours to overwrite
	}
	if slices.ContainsFunc(n.IPs, func(a netip.Addr) bool { return slices.Contains(nodeIPs, a) }) {
		return nil
	}
	return fmt.Errorf("%w: %s is published by a live node at %v (this node is at %v); give every node of a cluster its own --node-name (if that node is gone, its record expires with its lease)",
		ErrNodeNameTaken, local.Node, n.IPs, nodeIPs)
}

// Status reports whether everything wanted is written, the number of
// keys wanted, and the last error.
func (p *Publisher) Status() (synced bool, keys int, lastErr error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.synced, len(p.want), p.lastErr
}

// Run syncs on every change until ctx ends.
func (p *Publisher) Run(ctx context.Context) {
	const (
		minBackoff = 100 * time.Millisecond
		maxBackoff = 10 * time.Second
	)
	var backoff time.Duration
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.trigger:
		case <-timer.C:
		}
		err := p.Sync(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			backoff = min(max(2*backoff, minBackoff), maxBackoff)
			p.log.Warn("clustermesh: publishing records failed; retrying", "in", backoff, "err", err)
			timer.Reset(backoff)
			continue
		}
		backoff = 0
		timer.Reset(time.Hour)
	}
}

// Sync writes what differs and deletes what is no longer wanted, once.
func (p *Publisher) Sync(ctx context.Context) error {
	p.mu.Lock()
	want, gen := p.want, p.gen
	written := maps.Clone(p.written)
	p.mu.Unlock()

	var errs []error
	// Writes go in transactions of up to txnBatch operations: a node with
	// many endpoints re-publishes in a few round trips, not one per key.
	type write struct {
		key   string
		value []byte // nil: delete
	}
	var batch []write
	flush := func() {
		if len(batch) == 0 {
			return
		}
		ops := make([]kvstore.Op, len(batch))
		for i, w := range batch {
			if w.value == nil {
				ops[i] = kvstore.OpDelete(w.key)
			} else {
				ops[i] = kvstore.OpPutLeased(w.key, w.value, p.lease)
			}
		}
		if _, err := p.c.Txn(ctx, nil, ops); err != nil {
			errs = append(errs, err)
		} else {
			p.mu.Lock()
			if p.gen == gen { // else written under a lease that is gone
				for _, w := range batch {
					if w.value == nil {
						delete(p.written, w.key)
					} else {
						p.written[w.key] = w.value
					}
				}
			}
			p.mu.Unlock()
		}
		batch = batch[:0]
	}
	add := func(w write) {
		batch = append(batch, w)
		if len(batch) == txnBatch {
			flush()
		}
	}
	// Node record first: a peer that sees an endpoint can find its node.
	keys := slices.Sorted(maps.Keys(want))
	slices.SortStableFunc(keys, func(a, b string) int {
		return btoi(!isNodeKey(a)) - btoi(!isNodeKey(b))
	})
	for _, k := range keys {
		v := want[k]
		if w, ok := written[k]; ok && w != nil && bytes.Equal(w, v) {
			continue
		}
		add(write{k, v})
	}
	for _, k := range slices.Sorted(maps.Keys(written)) {
		if _, ok := want[k]; !ok {
			add(write{k, nil})
		}
	}
	flush()
	var err error
	if len(errs) > 0 {
		err = fmt.Errorf("publishing the node's records: %w", errs[0])
	}
	p.mu.Lock()
	p.lastErr = err
	p.synced = err == nil && p.gen == gen && sameKeys(p.want, want)
	p.mu.Unlock()
	return err
}

func isNodeKey(k string) bool {
	_, _, err := records.ParseNodeKey(k)
	return err == nil
}

// sameKeys reports whether a and b are the same map (Set replaces, never
// modifies, so identity of content is enough to compare by length and keys).
func sameKeys(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}
