// Package northsouth is the way into the mesh from outside: it attaches the
// datapath's from_external and to_external programs (bpf, c/datapath.c) to
// the node's external devices, and keeps the nftables table that
// masquerades flows under externalTrafficPolicy Cluster.
//
// The frontends themselves (isth_lb) are written by agent/datapath from
// desired state; this package owns only the attachment and the SNAT.
//
// Why nftables for the SNAT: a flow from outside translated to a backend on
// another node (or in another cluster, or through the WireGuard device)
// must come back through this node, so the node puts its own address in
// as the source. from_external marks such packets (bpf.SNATMark) and the
// table's postrouting chain masquerades what carries the mark; the
// kernel's conntrack picks the port, undoes the SNAT on the replies
// wherever they arrive (any device), and hands them to the routing, so
// they leave through an external device where to_external undoes the
// DNAT. Doing the SNAT in BPF instead would need a port allocator and
// reply handling on every device a reply can arrive on.
//
// The table is named after the node (isthmus-<node>), so two agents in one
// network namespace (a lab) never touch each other's; it exists only while
// some frontend needs it (conntrack then runs on the node's traffic), and
// RemoveTable removes it on a deliberate cleanup (--reset-datapath).
//
// Restarts keep flows: the links are pinned and updated in place, the
// table stays, and conntrack (the kernel's and the datapath's) is not
// touched.
package northsouth
