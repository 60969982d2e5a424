package api

import (
	"context"
	"net/http"
	"net/netip"
	"net/url"
	"time"
)

// BGPStatus is the node's BGP speaker: the policy it follows, its
// sessions and (when asked for) the routes it announces.
type BGPStatus struct {
	// Policy is the BGPPeeringPolicy in use ("" when none selects the
	// node: no speaker runs).
	Policy string `json:"policy,omitempty"`
	// Ignored are other policies that select the node too (refused: one
	// policy per node, the first by name wins).
	Ignored  []string `json:"ignored,omitempty"`
	LocalASN uint32   `json:"localASN,omitempty"`
	RouterID string   `json:"routerID,omitempty"`
	// Advertised counts the prefixes the speaker announces.
	Advertised int       `json:"advertised"`
	Peers      []BGPPeer `json:"peers"`
	// Routes is filled only by BGP(ctx, true).
	Routes    []BGPRoute `json:"routes,omitempty"`
	LastError string     `json:"lastError,omitempty"`
}

// BGPPeer is one BGP session.
type BGPPeer struct {
	Address netip.Addr `json:"address"`
	Port    uint16     `json:"port"`
	PeerASN uint32     `json:"peerASN"`
	// State is idle, connect, active, opensent, openconfirm,
	// established, or not-configured (see LastError).
	State string `json:"state"`
	// Since is when the session came up (established) or last went down.
	Since time.Time `json:"since,omitzero"`
	// LastError is the latest reason the session failed: a NOTIFICATION
	// with its code, a connect error, a password file that cannot be read.
	LastError       string    `json:"lastError,omitempty"`
	LastErrorAt     time.Time `json:"lastErrorAt,omitzero"`
	Received        uint64    `json:"received"` // prefixes received (all rejected: export only)
	Advertised      uint64    `json:"advertised"`
	Flaps           uint32    `json:"flaps"`
	MD5             bool      `json:"md5"`
	GracefulRestart bool      `json:"gracefulRestart"`
	RestartTime     int       `json:"restartTimeSeconds,omitempty"`
}

// BGPRoute is one announced prefix.
type BGPRoute struct {
	Prefix      netip.Prefix `json:"prefix"`
	Communities []string     `json:"communities,omitempty"`
	LocalPref   uint32       `json:"localPreference,omitempty"`
	// Sources say why it is announced: "pod-cidr" or
	// "<Type> <namespace>/<service>".
	Sources []string `json:"sources,omitempty"`
}

func (s *Server) bgp(r *http.Request) (int, any, error) {
	st, err := s.backend.BGP(r.Context(), r.URL.Query().Get("routes") == "true")
	st.Peers = nonNil(st.Peers)
	return http.StatusOK, st, err
}

// BGP returns the node's BGP status, with the announced routes when
// routes is set.
func (c *Client) BGP(ctx context.Context, routes bool) (BGPStatus, error) {
	var st BGPStatus
	var q url.Values
	if routes {
		q = url.Values{"routes": {"true"}}
	}
	err := c.do(ctx, http.MethodGet, "/v1/bgp", q, "", nil, &st)
	return st, err
}
