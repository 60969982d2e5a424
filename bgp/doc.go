// Package bgp is the node's BGP speaker: GoBGP v3 embedded in the agent,
// export only. It announces the prefixes it is given (pod CIDRs and
// service addresses) to the peers it is given and learns nothing: a global
// import policy rejects every received route, and nothing is installed
// into the kernel (GoBGP touches the kernel only through zebra, which is
// never enabled).
//
// Contract:
//
//	func New(log *slog.Logger) *Speaker
//	func (s *Speaker) Reconcile(ctx context.Context, want Config) error
//	func (s *Speaker) ReconcileChanges(ctx context.Context, want Config, set []Path, del []netip.Prefix) error
//	func (s *Speaker) Peers(ctx context.Context) []PeerStatus
//	func (s *Speaker) Routes(ctx context.Context) ([]Route, error)
//	func (s *Speaker) Detach(ctx context.Context) // process exit: peers keep routes (graceful restart)
//	func (s *Speaker) Withdraw(ctx context.Context) error // deliberate: peers drop routes now
//
// Reconcile diffs: peers are added, updated (deleted and re-added when a
// setting that needs a new session changed) or deleted; paths are added or
// withdrawn one by one for what changed only. ReconcileChanges takes the
// paths as changes against the last call (Reconcile works out the changes
// from the whole list), so a change costs what it touches, not the size of
// the table. A change of the local AS or router
// ID restarts the speaker (the sessions go down with a Cease).
//
// Graceful restart (RFC 4724). GoBGP's Stop (and DeletePeer) sends a
// Cease NOTIFICATION, which ends graceful restart at the peer: it drops
// the routes at once. Detach instead shuts the speaker's TCP connections
// down at the socket (shutdown(2)) before it stops GoBGP, so the peer sees
// the connection close without a NOTIFICATION and keeps the routes for
// the restart time, as after a crash or SIGKILL. The next speaker opens
// its sessions with the Restart State and Forwarding bits set (the
// datapath kept forwarding), re-announces its paths and ends each family
// with End-of-RIB; the peer then drops only the stale routes that were
// not announced again. A deliberate withdrawal (Withdraw, a peer removed
// from the Config, or an empty Config) sends the Cease.
//
// Sessions: one address family per session, the neighbour's (IPv4 unicast
// over IPv4, IPv6 unicast over IPv6), so next hops are always of the
// prefix's family. The speaker dials out; it listens only when
// Config.ListenPort is set.
package bgp
