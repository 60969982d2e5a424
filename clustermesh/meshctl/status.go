package meshctl

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Status is what `isthmus clustermesh status` shows: this cluster and the
// mirror's status of every connected one.
type Status struct {
	Cluster   string         `json:"cluster"`
	ClusterID uint32         `json:"clusterID"`
	PodCIDRs  []netip.Prefix `json:"podCIDRs,omitempty"`
	Endpoints []string       `json:"endpoints"`
	// Heartbeat is the server's last heartbeat: statuses are only as
	// fresh as it.
	Heartbeat time.Time       `json:"heartbeat,omitzero"`
	Remotes   []mirror.Status `json:"remotes"`
}

// HeartbeatStale: a heartbeat older than this means the server is probably
// not running (and the statuses may be old).
const HeartbeatStale = 30 * time.Second

// ReadStatus reads the local cluster's info and config, its heartbeat and
// the mirror's status of every connected cluster (a cluster without one
// yet shows as connecting).
func ReadStatus(ctx context.Context, kv *kvstore.Client) (Status, error) {
	info, cfg, err := LocalCluster(ctx, kv)
	if err != nil {
		return Status{}, err
	}
	st := Status{Cluster: info.Cluster, ClusterID: info.ClusterID, PodCIDRs: cfg.PodCIDRs, Endpoints: info.Endpoints, Remotes: []mirror.Status{}}
	if got, found, err := kv.Get(ctx, records.HeartbeatKey(info.Cluster)); err == nil && found {
		if stamp, err := records.DecodeStamp(got.Value); err == nil {
			st.Heartbeat = stamp.Time
		}
	}
	statuses, _, err := kv.GetPrefix(ctx, etcdserver.RemoteStatusPrefix)
	if err != nil {
		return Status{}, err
	}
	byName := map[string]mirror.Status{}
	for _, s := range statuses {
		if rs, err := mirror.DecodeStatus(s.Value); err == nil {
			byName[rs.Cluster] = rs
		}
	}
	recs, _, err := kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
	if err != nil {
		return Status{}, err
	}
	for _, r := range recs {
		name, err := mirror.ParseRemoteKey(r.Key)
		if err != nil {
			continue
		}
		rs, ok := byName[name]
		if !ok {
			// Connected a moment ago, or the server is not running.
			rs = mirror.Status{Cluster: name, State: mirror.StateConnecting}
			if rec, err := mirror.DecodeRemote(r.Key, r.Value, info.Cluster); err == nil {
				rs.ClusterID, rs.KVStoreEndpoints = rec.ClusterID, rec.Endpoints
			}
		}
		st.Remotes = append(st.Remotes, rs)
	}
	slices.SortFunc(st.Remotes, func(a, b mirror.Status) int { return strings.Compare(a.Cluster, b.Cluster) })
	return st, nil
}
