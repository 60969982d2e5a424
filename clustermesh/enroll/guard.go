package enroll

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Guard watches the records external workloads publish with their own
// credential and cuts off (Revoke) a host whose records do not match its
// enrollment: a node record whose CIDRs are not exactly its addresses, an
// ipcache entry for another address or under an identity that is not its
// labels', or any record of a workload that is not enrolled (deleted or
// revoked behind the CLI's back). A host can write only under its own
// node's keys (VMPermissions), and readers check that its ipcache entries
// lie inside its node record's CIDRs; this closes the rest: a compromised
// host cannot claim another host's addresses or another identity. It runs
// in the server until ctx ends.
func Guard(ctx context.Context, kv *kvstore.Client, cluster string, log *slog.Logger) {
	nodes := kv.WatchPrefix(ctx, records.StateClusterPrefix(records.KindNodes, cluster))
	ips := kv.WatchPrefix(ctx, records.StateClusterPrefix(records.KindIP, cluster))
	for nodes != nil || ips != nil {
		var ev kvstore.Event
		var ok, isNode bool
		select {
		case ev, ok = <-nodes:
			if !ok {
				nodes = nil
				continue
			}
			isNode = true
		case ev, ok = <-ips:
			if !ok {
				ips = nil
				continue
			}
		}
		if ev.Type != kvstore.EventUpsert {
			continue
		}
		name, reason, enrolled := checkRecord(ctx, kv, cluster, ev, isNode)
		if reason == "" {
			continue
		}
		var err error
		if enrolled {
			// The host published what it was not given: revoked.
			log.Error("external workload cut off: its records do not match its enrollment", "workload", name, "key", ev.Key, "reason", reason)
			err = Revoke(ctx, kv, cluster, name)
		} else {
			// Records of a host not enrolled (any more): they go, and
			// the tokens stay (one may be waiting for a new enrollment).
			log.Warn("external workload: removing records of a workload that is not enrolled", "workload", name, "key", ev.Key, "reason", reason)
			err = cutRecords(ctx, kv, cluster, name)
		}
		if err != nil && ctx.Err() == nil {
			log.Error("external workload: cutting off failed", "workload", name, "err", err)
		}
	}
}

// checkRecord returns the workload of a record, why the record is not
// acceptable ("" when it is, when it is not a workload's, or when it is no
// longer there as the event saw it: a later event tells), and whether the
// workload is enrolled.
func checkRecord(ctx context.Context, kv *kvstore.Client, cluster string, ev kvstore.Event, isNode bool) (string, string, bool) {
	name, reason, enrolled := checkRecordNow(ctx, kv, cluster, ev, isNode)
	if reason == "" {
		return name, "", enrolled
	}
	if r, found, err := kv.Get(ctx, ev.Key); err != nil || !found || r.ModRevision != ev.Revision {
		return name, "", enrolled // gone or rewritten since: stale
	}
	return name, reason, enrolled
}

func checkRecordNow(ctx context.Context, kv *kvstore.Client, cluster string, ev kvstore.Event, isNode bool) (string, string, bool) {
	var node string
	var prefix netip.Prefix
	var err error
	if isNode {
		_, node, err = records.ParseNodeKey(ev.Key)
	} else {
		_, node, prefix, err = records.ParseIPCacheKey(ev.Key)
	}
	name, ok := strings.CutPrefix(node, NodePrefix)
	if err != nil || !ok {
		return "", "", false
	}
	w, rev, err := Get(ctx, kv, name)
	switch {
	case err != nil:
		return "", "", false // unreadable now; the next event or relist checks again
	case rev == 0:
		return name, "no such ExternalWorkload", false
	case !w.Status.Enrolled:
		return name, "the workload is not enrolled", false
	}
	var want []netip.Prefix
	for _, a := range w.Status.Addresses {
		want = append(want, netip.PrefixFrom(a, a.BitLen()))
	}
	if isNode {
		n, err := records.DecodeNode(ev.Value)
		if err != nil {
			return name, "invalid node record: " + err.Error(), true
		}
		got := slices.Clone(n.PodCIDRs)
		slices.SortFunc(got, netip.Prefix.Compare)
		slices.SortFunc(want, netip.Prefix.Compare)
		if !slices.Equal(got, want) {
			return name, fmt.Sprintf("node record claims %v, enrolled with %v", n.PodCIDRs, want), true
		}
		return name, "", true
	}
	if !slices.Contains(want, prefix) {
		return name, fmt.Sprintf("ipcache entry for %s, enrolled with %v", prefix, want), true
	}
	e, err := records.DecodeIPCacheEntry(ev.Value)
	if err != nil {
		return name, "invalid ipcache entry: " + err.Error(), true
	}
	r, found, err := kv.Get(ctx, records.IdentityIDKey(e.Identity))
	if err != nil {
		return "", "", false
	}
	if !found {
		return name, fmt.Sprintf("ipcache entry under identity %d, which does not exist", e.Identity), true
	}
	id, err := records.DecodeIdentity(r.Value)
	wantLabels := map[string]string{identity.LabelNamespace: w.Metadata.Namespace, identity.LabelCluster: cluster}
	maps.Copy(wantLabels, w.Metadata.Labels)
	if err != nil || !maps.Equal(id.Labels, wantLabels) {
		return name, fmt.Sprintf("ipcache entry under identity %d (%v), not the workload's labels %v", e.Identity, id.Labels, wantLabels), true
	}
	return name, "", true
}
