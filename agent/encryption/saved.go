package encryption

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"os"

	"github.com/isthmus-mesh/isthmus/gateway/wireguard"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
)

// savedPlan is the peersFile format.
type savedPlan struct {
	Peers []savedPeer `json:"peers"`
	// Unreachable are the pod CIDRs that fail closed.
	Unreachable []netip.Prefix `json:"unreachable"`
}

type savedPeer struct {
	Node       string         `json:"node"`
	PublicKey  string         `json:"publicKey"`
	Endpoint   netip.AddrPort `json:"endpoint"`
	AllowedIPs []netip.Prefix `json:"allowedIPs"`
}

func (e *WireGuard) savePlan(plan encryptionPlan) {
	sp := savedPlan{Unreachable: plan.unreachable}
	for _, p := range plan.peers {
		sp.Peers = append(sp.Peers, savedPeer{Node: plan.peerNodes[p.PublicKey], PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs})
	}
	data, err := json.MarshalIndent(sp, "", "  ")
	if err != nil || bytes.Equal(data, e.saved) {
		return
	}
	if err := atomicfile.Write(e.peersFile, data, 0o600); err != nil {
		e.log.Warn("wireguard: cannot save the peers for a restart without etcd", "err", err)
		return
	}
	e.saved = data
}

// restore applies the saved plan once, until the mesh is listed:
// tunnels to the nodes known at the last sync. A missing or unreadable
// file leaves only the fail-closed routes of the earlier run.
func (e *WireGuard) restore(local []netip.Prefix) (int, error) {
	if e.restored {
		return 0, nil
	}
	data, err := os.ReadFile(e.peersFile)
	if errors.Is(err, os.ErrNotExist) {
		e.restored = true
		return 0, nil
	}
	var sp savedPlan
	if err == nil {
		err = strictjson.Decode(data, &sp)
	}
	if err != nil {
		e.restored = true
		e.log.Warn("wireguard: ignoring the saved peers; tunnels come back when etcd is reachable", "file", e.peersFile, "err", err)
		return 0, nil
	}
	plan := encryptionPlan{peerNodes: map[string]string{}, unreachable: sp.Unreachable}
	for _, p := range sp.Peers {
		plan.peers = append(plan.peers, wireguard.Peer{PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs})
		plan.peerNodes[p.PublicKey] = p.Node
		plan.routes = append(plan.routes, p.AllowedIPs...)
	}
	n, err := e.apply(plan, local)
	if err == nil {
		e.restored, e.saved = true, data
		e.log.Info("wireguard: peers restored from the last sync until etcd is listed", "peers", len(plan.peers))
	}
	return n, err
}
