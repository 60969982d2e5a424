// Package enroll makes VMs and bare-metal hosts members of their cluster
// (external workloads, docs/vms.md): the ExternalWorkload objects and their
// one-time tokens in the cluster's etcd, the server's HTTPS enrollment
// endpoint, and revocation.
//
// Everything lives under Prefix, outside isthmus/: nodes read everything
// under isthmus/ (but isthmus/remotes/) and remote clusters read a few
// prefixes of it, so neither ever sees a workload, a token hash or an
// address claim. Only root (the server and `isthmus vm`) does.
package enroll

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Keys.
const (
	Prefix          = "isthmus-vm/"
	WorkloadsPrefix = Prefix + "workloads/"
	TokensPrefix    = Prefix + "tokens/"
	AddressesPrefix = Prefix + "addresses/"
	// GenerationsPrefix holds the last enrollment generation of every name
	// ever enrolled (records.EnrollmentUser); it outlives the workload, so
	// a name deleted and created again never gets an old user back.
	GenerationsPrefix = Prefix + "generations/"
	// ServerKey holds the enrollment endpoint's Endpoint (written by the
	// server at start, read by `isthmus vm token create`).
	ServerKey = Prefix + "server"
)

// NodePrefix starts the node name of every external workload: a host
// named db1 is node vm-db1 of its cluster (its records, its etcd user
// node-vm-db1), so it never takes a Kubernetes node's name.
const NodePrefix = "vm-"

// NodeName returns the node name of workload name.
func NodeName(name string) string { return NodePrefix + name }

// WorkloadKey returns the key of workload name.
func WorkloadKey(name string) string { return WorkloadsPrefix + name }

// GenerationKey returns the key of name's last enrollment generation.
func GenerationKey(name string) string { return GenerationsPrefix + name }

// generation returns name's last enrollment generation (0: never) and
// the revision of its key.
func generation(ctx context.Context, kv *kvstore.Client, name string) (int, int64, error) {
	r, found, err := kv.Get(ctx, GenerationKey(name))
	if err != nil || !found {
		return 0, 0, err
	}
	n, err := strconv.Atoi(string(r.Value))
	if err != nil || n < 0 {
		return 0, 0, fmt.Errorf("%s: not a generation: %q", GenerationKey(name), r.Value)
	}
	return n, r.ModRevision, nil
}

// AddressKey returns the claim of addr.
func AddressKey(addr netip.Addr) string { return AddressesPrefix + addr.String() }

// TokenKey returns the key of a token's record: the hex SHA-256 of the
// whole token, so the store never holds a token in clear.
func TokenKey(token string) string {
	sum := sha256.Sum256([]byte(token))
	return TokensPrefix + hex.EncodeToString(sum[:])
}

// Endpoint is what the server announces about its enrollment endpoint.
type Endpoint struct {
	URL           string `json:"url"`
	CAFingerprint string `json:"caFingerprint"` // hex SHA-256 of the CA's DER
	Cluster       string `json:"cluster"`
}

// TokenRecord is stored at TokenKey(token).
type TokenRecord struct {
	Name    string    `json:"name"`
	Cluster string    `json:"cluster"`
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires"`
	// Used is set, in the transaction that enrolls, by the one enrollment
	// the token allows; the record stays until it expires so a replay gets
	// "already used" rather than "unknown".
	Used time.Time `json:"used,omitzero"`
}

// tokenMagic starts every token; the version lets the format change.
const tokenMagic = "ivm1"

// NewToken returns a fresh token for workload name of cluster:
// ivm1.<cluster>.<name>.<32 random bytes, base64url>. Cluster and name are
// in clear so that a token for another cluster is refused with a clear
// message; the secret is what the server checks (by its hash).
func NewToken(cluster, name string) (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return strings.Join([]string{tokenMagic, cluster, name, base64.RawURLEncoding.EncodeToString(b[:])}, "."), nil
}

// ParseToken splits a token into its cluster and workload name, checking
// its form only.
func ParseToken(token string) (cluster, name string, err error) {
	parts := strings.Split(strings.TrimSpace(token), ".")
	if len(parts) != 4 || parts[0] != tokenMagic {
		return "", "", errors.New("malformed token (want ivm1.<cluster>.<name>.<secret>, as printed by isthmus vm token create)")
	}
	if records.ValidateClusterName(parts[1]) != nil || records.ValidateNodeName(NodeName(parts[2])) != nil {
		return "", "", errors.New("malformed token: bad cluster or workload name")
	}
	if s, err := base64.RawURLEncoding.DecodeString(parts[3]); err != nil || len(s) != 32 {
		return "", "", errors.New("malformed token: bad secret")
	}
	return parts[1], parts[2], nil
}

// Get returns workload name and its record's revision (0: missing).
func Get(ctx context.Context, kv *kvstore.Client, name string) (objects.ExternalWorkload, int64, error) {
	r, found, err := kv.Get(ctx, WorkloadKey(name))
	if err != nil || !found {
		return objects.ExternalWorkload{}, 0, err
	}
	var w objects.ExternalWorkload
	if err := json.Unmarshal(r.Value, &w); err != nil {
		return objects.ExternalWorkload{}, 0, fmt.Errorf("workload %s: unreadable record: %w", name, err)
	}
	return w, r.ModRevision, nil
}

// List returns every workload.
func List(ctx context.Context, kv *kvstore.Client) ([]objects.ExternalWorkload, error) {
	kvs, _, err := kv.GetPrefix(ctx, WorkloadsPrefix)
	if err != nil {
		return nil, err
	}
	var out []objects.ExternalWorkload
	for _, r := range kvs {
		var w objects.ExternalWorkload
		if err := json.Unmarshal(r.Value, &w); err != nil {
			continue // only root writes here; an unreadable one is skipped, not fatal
		}
		out = append(out, w)
	}
	return out, nil
}

// Apply creates workload w or changes its spec and labels. An enrolled
// host's identity and addresses are fixed while it is enrolled: changing
// them needs a revocation first.
func Apply(ctx context.Context, kv *kvstore.Client, w objects.ExternalWorkload) error {
	if err := w.Validate(); err != nil {
		return err
	}
	old, rev, err := Get(ctx, kv, w.Metadata.Name)
	if err != nil {
		return err
	}
	if rev != 0 {
		if old.Status.Enrolled && !sameIdentity(old, w) {
			return fmt.Errorf("workload %s is enrolled: revoke it (isthmus vm revoke %s) before changing its labels, namespace or addresses", w.Metadata.Name, w.Metadata.Name)
		}
		w.Status = old.Status
	} else {
		w.Status = objects.ExternalWorkloadStatus{}
	}
	data, err := json.Marshal(w)
	if err != nil {
		return err
	}
	ok, err := kv.Txn(ctx, []kvstore.Cond{kvstore.KeyModRevision(WorkloadKey(w.Metadata.Name), rev)},
		[]kvstore.Op{kvstore.OpPut(WorkloadKey(w.Metadata.Name), data)})
	if err == nil && !ok {
		err = fmt.Errorf("workload %s changed meanwhile; try again", w.Metadata.Name)
	}
	return err
}

func sameIdentity(a, b objects.ExternalWorkload) bool {
	return a.Metadata.Namespace == b.Metadata.Namespace && a.Spec == b.Spec &&
		records.LabelsString(a.Metadata.Labels) == records.LabelsString(b.Metadata.Labels)
}

// CreateToken stores a new single-use token for workload name, valid for
// ttl, and returns it (the only time it exists in clear). The workload
// must exist and not be enrolled.
func CreateToken(ctx context.Context, kv *kvstore.Client, cluster, name string, ttl time.Duration) (string, time.Time, error) {
	if ttl <= 0 || ttl > 7*24*time.Hour {
		return "", time.Time{}, fmt.Errorf("token TTL %s: want more than 0 and at most 168h", ttl)
	}
	w, rev, err := Get(ctx, kv, name)
	if err != nil {
		return "", time.Time{}, err
	}
	if rev == 0 {
		return "", time.Time{}, fmt.Errorf("no ExternalWorkload %q: create it first (isthmus vm apply -f FILE)", name)
	}
	if w.Status.Enrolled {
		return "", time.Time{}, fmt.Errorf("workload %s is already enrolled: revoke it first (isthmus vm revoke %s) to enroll it again", name, name)
	}
	token, err := NewToken(cluster, name)
	if err != nil {
		return "", time.Time{}, err
	}
	now := time.Now().UTC()
	rec := TokenRecord{Name: name, Cluster: cluster, Created: now, Expires: now.Add(ttl)}
	data, _ := json.Marshal(rec)
	// Bound to the workload as it is now: deleted or changed meanwhile,
	// the token is not written.
	ok, err := kv.Txn(ctx, []kvstore.Cond{kvstore.KeyModRevision(WorkloadKey(name), rev), kvstore.KeyMissing(TokenKey(token))},
		[]kvstore.Op{kvstore.OpPut(TokenKey(token), data)})
	if err == nil && !ok {
		err = fmt.Errorf("workload %s changed meanwhile; try again", name)
	}
	if err != nil {
		return "", time.Time{}, err
	}
	return token, rec.Expires, nil
}

// deleteTokens removes every token record of workload name, and the
// expired ones of any workload.
func deleteTokens(ctx context.Context, kv *kvstore.Client, name string) error {
	kvs, _, err := kv.GetPrefix(ctx, TokensPrefix)
	if err != nil {
		return err
	}
	now := time.Now()
	for _, r := range kvs {
		var t TokenRecord
		if json.Unmarshal(r.Value, &t) != nil || t.Name == name || now.After(t.Expires) {
			if err := kv.Delete(ctx, r.Key); err != nil {
				return err
			}
		}
	}
	return nil
}

// Revoke cuts workload name off: its tokens are deleted, its etcd user and
// role deleted (its certificate no longer maps to a user, so every request
// fails), its node record, ipcache entries and identity references
// removed (with its lease, which they are attached to), so every node
// drops its WireGuard peer and its ipcache entries. The workload stays,
// marked revoked; a new token enrolls it again.
func Revoke(ctx context.Context, kv *kvstore.Client, cluster, name string) error {
	w, rev, err := Get(ctx, kv, name)
	if err != nil {
		return err
	}
	if rev != 0 {
		w.Status.Enrolled, w.Status.Revoked = false, true
		data, _ := json.Marshal(w)
		if err := kv.Put(ctx, WorkloadKey(name), data); err != nil {
			return err
		}
	}
	return cut(ctx, kv, cluster, name)
}

// Delete revokes workload name and deletes it with its address claims.
func Delete(ctx context.Context, kv *kvstore.Client, cluster, name string) error {
	_, rev, err := Get(ctx, kv, name)
	if err != nil {
		return err
	}
	if rev == 0 {
		return fmt.Errorf("no ExternalWorkload %q", name)
	}
	if err := kv.Delete(ctx, WorkloadKey(name)); err != nil {
		return err
	}
	if err := cut(ctx, kv, cluster, name); err != nil {
		return err
	}
	return releaseAddresses(ctx, kv, name)
}

func releaseAddresses(ctx context.Context, kv *kvstore.Client, name string) error {
	kvs, _, err := kv.GetPrefix(ctx, AddressesPrefix)
	if err != nil {
		return err
	}
	for _, r := range kvs {
		if string(r.Value) == name {
			if err := kv.Delete(ctx, r.Key); err != nil {
				return err
			}
		}
	}
	return nil
}

// cut is the part of Revoke that touches the mesh: the tokens, then the
// credential and the records (cutRecords).
func cut(ctx context.Context, kv *kvstore.Client, cluster, name string) error {
	if err := deleteTokens(ctx, kv, name); err != nil {
		return fmt.Errorf("revoke %s: tokens: %w", name, err)
	}
	return cutRecords(ctx, kv, cluster, name)
}

// cutRecords deletes the credential of name's last enrollment and then its
// records: the credential first, so the host cannot write them back.
func cutRecords(ctx context.Context, kv *kvstore.Client, cluster, name string) error {
	node := NodeName(name)
	// The user of the last enrollment: those before it went with their
	// own revocations (generations only grow).
	gen, _, err := generation(ctx, kv, name)
	if err != nil {
		return fmt.Errorf("revoke %s: %w", name, err)
	}
	user := records.EnrollmentUser(node, gen)
	if err := kv.DeleteUser(ctx, user); err != nil {
		return fmt.Errorf("revoke %s: etcd user: %w", name, err)
	}
	if err := kv.DeleteRole(ctx, user); err != nil {
		return fmt.Errorf("revoke %s: etcd role: %w", name, err)
	}
	// The node record's lease carries its ipcache entries and identity
	// references: revoking it removes them in one step.
	if r, found, err := kv.Get(ctx, records.NodeKey(cluster, node)); err != nil {
		return fmt.Errorf("revoke %s: %w", name, err)
	} else if found && r.Lease != 0 {
		if err := kv.RevokeLease(ctx, r.Lease); err != nil {
			return fmt.Errorf("revoke %s: lease: %w", name, err)
		}
	}
	if err := kv.Delete(ctx, records.NodeKey(cluster, node)); err != nil {
		return fmt.Errorf("revoke %s: node record: %w", name, err)
	}
	if _, err := kv.DeletePrefix(ctx, records.NodeIPCachePrefix(cluster, node)); err != nil {
		return fmt.Errorf("revoke %s: ipcache: %w", name, err)
	}
	return nil
}
