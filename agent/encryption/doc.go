// Package encryption is transparent encryption (--encryption=wireguard):
// the reconciler of the node's WireGuard device. Its public key is
// published in the node record; its peers and routes are reconciled from
// the node records of the whole mesh (wireguard.go, plan.go), and the last
// plan is saved for a restart while etcd is away (saved.go).
//
// Routing. The tunnel routes live in their own table (Table, routing.go),
// reached through one policy rule:
//
//   - pod-to-pod mode: "from <this node's pod CIDR> lookup 73". Only
//     traffic that pods send takes the tunnel; replies to and from node
//     addresses stay on the underlay, symmetric on both ends.
//   - node encryption: "not fwmark <mark> lookup 73", and the table also
//     routes every other node's underlay address into the tunnel. The
//     device marks its own UDP packets, so they skip the rule and leave
//     through the underlay.
//
// The table routes every remote pod CIDR into the device, and also holds
// an "unreachable" route for each at a worse metric. When the device is
// gone (the embedded engine dies with the agent) or a node publishes no key,
// pod traffic to those CIDRs fails closed instead of leaving in plaintext
// through the main table.
package encryption
