package meshsync

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Files of a credentials bundle directory (see docs/internal-contracts.md).
const (
	BundleCA   = "ca.crt"
	BundleCert = "client.crt"
	BundleKey  = "client.key"
)

// meshDomain is the domain of the name a cluster's server certificate
// carries, <cluster>.mesh.isthmus.io, so that it verifies whatever address
// an agent dials. It must equal clustermesh/server.MeshDomain (a test checks).
const meshDomain = "mesh.isthmus.io"

// ServerName is the TLS server name of cluster's etcd.
func ServerName(cluster string) string { return cluster + "." + meshDomain }

// LoadBundle reads a bundle directory into a TLS client configuration for
// cluster's etcd: the cluster's CA, the client certificate whose common
// name is the etcd user, and the server name every server certificate of
// the cluster carries.
func LoadBundle(dir, cluster string) (*tls.Config, error) {
	ca, err := os.ReadFile(filepath.Join(dir, BundleCA))
	if err != nil {
		return nil, fmt.Errorf("kvstore bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("kvstore bundle: %s holds no PEM certificate", filepath.Join(dir, BundleCA))
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, BundleCert), filepath.Join(dir, BundleKey))
	if err != nil {
		return nil, fmt.Errorf("kvstore bundle %s: %w", dir, err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: ServerName(cluster), MinVersion: tls.VersionTLS12,
		GetClientCertificate: reloading(dir, cert)}, nil
}

// reloading returns the bundle's client certificate as the files hold it
// at each handshake: a renewed certificate (an external workload renews
// its own, agent --join) is used from the next connection on without a
// restart. Files that do not load (half written, removed) keep the last
// good pair.
func reloading(dir string, cert tls.Certificate) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	var mu sync.Mutex
	cur := cert
	var stamp time.Time
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		if st, err := os.Stat(filepath.Join(dir, BundleCert)); err == nil && !st.ModTime().Equal(stamp) {
			if c, err := tls.LoadX509KeyPair(filepath.Join(dir, BundleCert), filepath.Join(dir, BundleKey)); err == nil {
				cur, stamp = c, st.ModTime()
			}
		}
		c := cur
		return &c, nil
	}
}

// BundleUser returns the etcd user of a loaded bundle: the common name of
// its client certificate.
func BundleUser(c *tls.Config) (string, error) {
	if len(c.Certificates) == 0 || len(c.Certificates[0].Certificate) == 0 {
		return "", errors.New("kvstore bundle: no client certificate")
	}
	leaf, err := x509.ParseCertificate(c.Certificates[0].Certificate[0])
	if err != nil {
		return "", fmt.Errorf("kvstore bundle: client certificate: %w", err)
	}
	return leaf.Subject.CommonName, nil
}

// CheckBundleUser checks that the etcd user of an agent's bundle may be
// used by node: its own node user (node-<node>), or one of the broad
// credentials ("agents", shared by every node; "root") for which it
// returns a warning. Another node's credential, or a remote cluster's, is
// an error: publishing would fail on every write, or worse, succeed as
// someone else.
func CheckBundleUser(user, node string) (warning string, err error) {
	own := records.NodeUser(node)
	_, isNode := records.NodeOfUser(user)
	switch {
	case user == own, records.IsEnrollmentUser(user, node):
		return "", nil
	case user == "agents" || user == "root":
		return fmt.Sprintf("the kvstore bundle is for etcd user %q, which may write every node's records: give each node its own (isthmus clustermesh certs --node %s)", user, node), nil
	case isNode:
		return "", fmt.Errorf("the kvstore bundle is for etcd user %q, not this node's %q: run isthmus clustermesh certs --node %s on the server host", user, own, node)
	default:
		return "", fmt.Errorf("the kvstore bundle is for etcd user %q, not a node's: run isthmus clustermesh certs --node %s on the server host", user, node)
	}
}

// ErrClusterConfig is wrapped by errors about a cluster-config that does
// not fit this node: retrying does not help, the configuration is wrong.
var ErrClusterConfig = errors.New("cluster configuration mismatch")

// CheckClusterConfig reads isthmus/cluster-config/<cluster> and checks it
// against this node: the same cluster ID, and the node's pod CIDRs inside
// the cluster's (a cluster-config without pod CIDRs constrains nothing).
// found is false while the server has not written it yet.
func CheckClusterConfig(ctx context.Context, c *kvstore.Client, local Local, podCIDRs []netip.Prefix) (cfg records.ClusterConfig, found bool, err error) {
	key := records.ClusterConfigKey(local.Cluster)
	kv, found, err := c.Get(ctx, key)
	if err != nil || !found {
		return records.ClusterConfig{}, false, err
	}
	cfg, err = records.DecodeClusterConfig(kv.Value)
	if err != nil {
		return records.ClusterConfig{}, true, fmt.Errorf("%w: %s: %w", ErrClusterConfig, key, err)
	}
	if cfg.Name != local.Cluster {
		return cfg, true, fmt.Errorf("%w: %s names cluster %q", ErrClusterConfig, key, cfg.Name)
	}
	if cfg.ID != local.ClusterID {
		return cfg, true, fmt.Errorf("%w: cluster %q has ID %d in etcd, this agent runs with --cluster-id %d",
			ErrClusterConfig, local.Cluster, cfg.ID, local.ClusterID)
	}
	if len(cfg.PodCIDRs) > 0 {
		for _, p := range podCIDRs {
			if !slices.ContainsFunc(cfg.PodCIDRs, func(q netip.Prefix) bool { return q.Bits() <= p.Bits() && q.Contains(p.Addr()) }) {
				return cfg, true, fmt.Errorf("%w: pod CIDR %s of this node is not inside the pod CIDRs of cluster %q (%s)",
					ErrClusterConfig, p, local.Cluster, joinPrefixes(cfg.PodCIDRs))
			}
		}
	}
	return cfg, true, nil
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

// ConfigGuardKey is written by every change of the applied objects. An
// apply reads it before it reads the objects, and its transaction holds
// only if the guard is unchanged: two concurrent applies cannot both pass
// a conflict check (a VIP taken twice) against the same old state.
const ConfigGuardKey = records.Root + "config-revision"

// Config is the applied objects read from etcd.
type Config struct {
	// Objects by objects.Key; values that do not decode are left out (and
	// listed in Invalid).
	Objects map[string]objects.Object
	// Raw holds every value as stored, by objects.Key.
	Raw     map[string][]byte
	Invalid []error
	// guardRev is the guard's revision read before the objects.
	guardRev int64
}

// ReadConfig reads the applied objects of kind ("" for every kind).
func ReadConfig(ctx context.Context, c *kvstore.Client, kind string) (Config, error) {
	return readConfig(ctx, c, kind, nil)
}

// ConfigCache keeps the objects a ReadConfig decoded, by key with the
// value they were decoded from, so that the next read decodes only what
// changed: an apply reads every applied object (for the conflict check),
// and decoding 10,000 services on each of ten applies of 1,000 made a bulk
// apply quadratic. The zero value is empty and ready; it is safe for
// concurrent use.
type ConfigCache struct {
	// Known, when not nil, returns the object that value raw of key (an
	// etcd key) decodes to, if the caller holds it decoded already (the
	// watch's tables): the objects an apply wrote are read by the next
	// apply, and were decoded once by the watch. It must give what
	// DecodeObject gives.
	Known func(key string, raw []byte) (objects.Object, bool)

	mu      sync.Mutex
	decoded map[string]cachedObject
	// rev is the revision at which decoded held every applied object
	// (0: unknown): a read of every kind then asks etcd for what changed
	// since, not for every value (GetPrefixSince). A read of one kind
	// keeps it: what that read took is at least as new.
	rev int64
}

type cachedObject struct {
	raw []byte
	obj objects.Object
	err error
}

// Read is ReadConfig that reuses what earlier reads decoded: a value equal
// to the one an object was decoded from decodes to the same object.
func (cc *ConfigCache) Read(ctx context.Context, c *kvstore.Client, kind string) (Config, error) {
	return readConfig(ctx, c, kind, cc)
}

func readConfig(ctx context.Context, c *kvstore.Client, kind string, cc *ConfigCache) (Config, error) {
	guard, found, err := c.Get(ctx, ConfigGuardKey)
	if err != nil {
		return Config{}, err
	}
	var guardRev int64
	if found {
		guardRev = guard.ModRevision
	}
	if cc != nil && kind == "" {
		cfg, ok, err := cc.readSince(ctx, c)
		if err != nil || ok {
			cfg.guardRev = guardRev
			return cfg, err
		}
	}
	cfg := Config{Objects: map[string]objects.Object{}, Raw: map[string][]byte{}, guardRev: guardRev}
	prefix := ConfigPrefix
	if kind != "" {
		prefix += kind + "/"
	}
	kvs, rev, err := c.GetPrefix(ctx, prefix)
	if err != nil {
		return Config{}, err
	}
	if cc == nil {
		for _, kv := range kvs {
			cfg.add(kv.Key, decodeValue(kv.Key, kv.Value))
		}
		return cfg, nil
	}
	cc.mu.Lock()
	prev := cc.decoded
	cc.mu.Unlock()
	next := make(map[string]cachedObject, len(kvs))
	for _, kv := range kvs {
		e := cc.entry(prev, kv.Key, kv.Value)
		next[kv.Key] = e
		cfg.add(kv.Key, e)
	}
	// A read of one kind keeps the other kinds' entries.
	for key, e := range prev {
		if _, ok := next[key]; !ok && !strings.HasPrefix(key, prefix) {
			next[key] = e
		}
	}
	cc.mu.Lock()
	cc.decoded = next
	if kind == "" {
		cc.rev = rev
	}
	cc.mu.Unlock()
	return cfg, nil
}

// readSince reads what changed since the cache's revision and returns
// every applied object; ok is false when it cannot tell (no revision yet,
// keys deleted since: the caller reads everything).
func (cc *ConfigCache) readSince(ctx context.Context, c *kvstore.Client) (Config, bool, error) {
	cc.mu.Lock()
	prev, since := cc.decoded, cc.rev
	cc.mu.Unlock()
	if since == 0 {
		return Config{}, false, nil
	}
	kvs, count, rev, err := c.GetPrefixSince(ctx, ConfigPrefix, since+1)
	if err != nil {
		return Config{}, false, err
	}
	next := maps.Clone(prev)
	for _, kv := range kvs {
		next[kv.Key] = cc.entry(prev, kv.Key, kv.Value)
	}
	// Every key stored now was written since (in kvs) or was there at
	// since (in prev): more keys than stored means some were deleted.
	if int64(len(next)) != count {
		return Config{}, false, nil
	}
	cfg := Config{Objects: make(map[string]objects.Object, len(next)), Raw: make(map[string][]byte, len(next))}
	var invalid []string
	for key, e := range next {
		if e.err != nil {
			invalid = append(invalid, key)
			continue
		}
		cfg.add(key, e)
	}
	slices.Sort(invalid) // Invalid in key order, as a full read lists it
	for _, key := range invalid {
		cfg.add(key, next[key])
	}
	cc.mu.Lock()
	cc.decoded, cc.rev = next, rev
	cc.mu.Unlock()
	return cfg, true, nil
}

// entry is the decoded value raw of key (an etcd key): prev's when it
// decoded the same value, the Known one, or decoded now.
func (cc *ConfigCache) entry(prev map[string]cachedObject, key string, raw []byte) cachedObject {
	if p, ok := prev[key]; ok && bytes.Equal(p.raw, raw) {
		return p
	}
	if cc.Known != nil {
		if o, ok := cc.Known(key, raw); ok {
			return cachedObject{raw: raw, obj: o}
		}
	}
	return decodeValue(key, raw)
}

func decodeValue(key string, raw []byte) cachedObject {
	o, err := DecodeObject(key, raw)
	return cachedObject{raw: raw, obj: o, err: err}
}

// add puts the value of an etcd key into the configuration.
func (cfg *Config) add(key string, e cachedObject) {
	k := strings.TrimPrefix(key, ConfigPrefix)
	cfg.Raw[k] = e.raw
	if e.err != nil {
		cfg.Invalid = append(cfg.Invalid, e.err)
		return
	}
	cfg.Objects[k] = e.obj
}

// ErrConcurrentChange says the applied objects changed between ReadConfig
// and WriteConfig: read again and re-check.
var ErrConcurrentChange = errors.New("the applied objects changed concurrently")

// WriteConfig stores put and deletes del (keys are objects.Key values) in
// one transaction that holds only if no other write of applied objects
// happened since read was taken.
func WriteConfig(ctx context.Context, c *kvstore.Client, read Config, cluster string, put map[string][]byte, del []string) error {
	stamp, err := records.Stamp{Cluster: cluster, Time: time.Now().UTC()}.Marshal()
	if err != nil {
		return err
	}
	// Sized once: an op is large, and a bulk apply writes a thousand.
	ops := make([]kvstore.Op, 0, len(put)+len(del)+1)
	for _, k := range slices.Sorted(maps.Keys(put)) {
		ops = append(ops, kvstore.OpPut(ConfigKey(k), put[k]))
	}
	for _, k := range del {
		ops = append(ops, kvstore.OpDelete(ConfigKey(k)))
	}
	ops = append(ops, kvstore.OpPut(ConfigGuardKey, stamp))
	applied, err := c.Txn(ctx, []kvstore.Cond{kvstore.KeyModRevision(ConfigGuardKey, read.guardRev)}, ops)
	if err != nil {
		return err
	}
	if !applied {
		return ErrConcurrentChange
	}
	return nil
}
