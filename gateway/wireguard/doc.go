// Package wireguard owns a node's WireGuard device: its lifecycle (device.go,
// with the embedded engine in userspace.go), its private key (keys.go) and
// the reconciliation of its peers (peers.go).
//
// Open uses the kernel's WireGuard when the module is there (probed by
// creating a link of type wireguard) and otherwise embeds
// golang.zx2c4.com/wireguard: a TUN with GSO/GRO offloads, UDP GSO/GRO
// sockets and a UAPI socket at /var/run/wireguard/<name>.sock, so wg(8) and
// wgctrl see it like a kernel device. Every configuration, in both modes,
// goes through wgctrl.
//
// The device, its UDP socket and its netlink sockets belong to the network
// namespace of the thread that called Open, whichever thread later touches
// them. Device names are unique per host, not per namespace, because the
// UAPI socket path is host-wide.
package wireguard
