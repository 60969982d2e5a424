// Package l2 answers ARP (IPv4, github.com/mdlayher/arp) and NDP (IPv6,
// github.com/mdlayher/ndp) for service addresses on a node's interfaces:
// the kernel does not, because the addresses are not assigned to any
// interface. It owns the sockets and the packets, nothing else: which
// addresses this node answers for (it leads them) is decided by agent/l2.
//
//	link.go       which interfaces may answer at all (not a bond member, not
//	              NOARP) and whether they have carrier
//	responder.go  one interface: ARP replies, NDP advertisements, gratuitous
//	              ARP / unsolicited NA bursts on takeover, periodic refresh
//	ndp.go        the IPv6 frames: NS parsing from AF_PACKET, NA building
//	announcer.go  the responders of a node by interface, and the link watch
//	              that silences an interface the moment it loses carrier
//
// Contract:
//
//	func NewAnnouncer(o Options, log *slog.Logger) *Announcer
//	func (a *Announcer) Sync(want map[string][]netip.Addr) map[string]error // interface -> addresses to answer
//	func (a *Announcer) Run(ctx context.Context, onLinkChange func())      // link watch
//	func (a *Announcer) Stats() Stats
//	func Links() ([]Link, error)                                          // interfaces and whether they can answer
//
// A responder answers only for the addresses it was given, only while its
// interface has carrier, and never on a bond member or a NOARP interface.
// For IPv6 it joins the solicited-node multicast group of each address (so
// NICs and MLD-snooping switches deliver the multicast solicitations),
// reads solicitations from an AF_PACKET socket (a unicast solicitation to a
// service address never reaches an ICMPv6 socket: the kernel does not
// deliver packets for addresses it does not own) and answers with the
// Override flag set: the node is the address's owner, not a proxy, and a
// takeover must replace the old leader's cached MAC.
package l2
