package etcdserver

import (
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"net/netip"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Keys the clustermesh server owns besides the shared layout of the
// records package. Agents may read isthmus/status/ but never
// isthmus/remotes/: remote records hold client keys (see agentPermissions).
const (
	// RemotesPrefix holds one record per connected remote cluster,
	// isthmus/remotes/<cluster>: where its server is and the credentials
	// of the read-only user remote-<local> there (written by `isthmus
	// clustermesh connect`, read by the mirror).
	RemotesPrefix = records.Root + "remotes/"
	// StatusPrefix holds what the server reports about itself.
	StatusPrefix = records.Root + "status/"
	// RemoteStatusPrefix holds the mirror's status of each remote,
	// isthmus/status/remotes/<cluster> (JSON).
	RemoteStatusPrefix = StatusPrefix + "remotes/"
	// InfoKey holds the server's Info (JSON), written at every start.
	InfoKey = StatusPrefix + "server"
)

// RemoteKey returns isthmus/remotes/<cluster>.
func RemoteKey(cluster string) string { return RemotesPrefix + cluster }

// RemoteStatusKey returns isthmus/status/remotes/<cluster>.
func RemoteStatusKey(cluster string) string { return RemoteStatusPrefix + cluster }

// prefixEnd returns the first key after every key that starts with p.
func prefixEnd(p string) string {
	b := []byte(p)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xff {
			b[i]++
			return string(b[:i+1])
		}
	}
	return "\x00"
}

// InfoVersion is the version of Info this build writes and reads.
const InfoVersion = 1

// Info describes a running server. It is stored at InfoKey in the
// cluster's etcd and, in embedded mode, as DataDir/cluster.json, so that the
// CLI on the server host learns the cluster from the data dir alone.
type Info struct {
	Version   int            `json:"version"`
	Cluster   string         `json:"cluster"`
	ClusterID uint32         `json:"clusterID"`
	PodCIDRs  []netip.Prefix `json:"podCIDRs,omitempty"`
	// Endpoints are the client URLs put into bundles (advertised).
	Endpoints []string `json:"endpoints"`
	// LocalURL is a client URL that works on the server's own host (the
	// listen address, 127.0.0.1 for an unspecified one); empty in external
	// mode.
	LocalURL string    `json:"localURL,omitempty"`
	Embedded bool      `json:"embedded"`
	Started  time.Time `json:"started"`
}

// DecodeInfo decodes an Info strictly.
func DecodeInfo(data []byte) (Info, error) {
	var in Info
	if err := strictjson.Decode(data, &in); err != nil {
		return Info{}, fmt.Errorf("server info: %w", err)
	}
	if in.Version != InfoVersion {
		return Info{}, fmt.Errorf("server info: version %d not supported (this build reads %d)", in.Version, InfoVersion)
	}
	if err := records.ValidateClusterName(in.Cluster); err != nil {
		return Info{}, fmt.Errorf("server info: %w", err)
	}
	if err := records.ValidateClusterID(in.ClusterID); err != nil {
		return Info{}, fmt.Errorf("server info: %w", err)
	}
	return in, nil
}

// ClusterConfig returns the cluster config the info describes.
func (in Info) ClusterConfig() records.ClusterConfig {
	return records.ClusterConfig{Version: records.CurrentVersion, Name: in.Cluster, ID: in.ClusterID, PodCIDRs: in.PodCIDRs}
}
