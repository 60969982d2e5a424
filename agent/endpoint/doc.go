// Package endpoint owns the kernel plumbing of a pod: the veth pair between
// the node and the pod's network namespace, the pod's addresses, its gateway
// routes and neighbours, the node's routes to the pod, and the per-device
// sysctls that make the pair forward. It is the project's one netlink helper
// set for pods; nothing else creates or removes pod devices.
//
// Addressing follows the routed (L3) model: the pod gets /32 and /128
// addresses and a default route through a fixed gateway (169.254.1.1 for IPv4,
// fe80::1 for IPv6) that no device owns. A permanent neighbour entry maps that
// gateway to the MAC of the host-side veth, so the pod never ARPs or solicits
// for it, and the node reaches the pod through a host route per address.
package endpoint
