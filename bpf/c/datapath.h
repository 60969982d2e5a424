/* Map layouts shared by the datapath programs. The Go side (package bpf) uses the
 * bpf2go-generated mirrors of these structs, so a layout change here is a
 * compile error there, not silent corruption. */
#pragma once

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

/* Every address is 16 bytes: IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d), so one
 * key layout serves both families. */
union addr {
	__u8 b[16];
	__be32 w[4];
};

#define CT_SCOPE_EGRESS 1  /* created where the flow left a local pod */
#define CT_SCOPE_INGRESS 2 /* created where the flow entered a local pod */
#define CT_SCOPE_EXTERNAL 3 /* created where a flow from outside the mesh entered
			     * the node (from_external): the client's tuple
			     * (DNAT) and the backend's reply tuple (reverse
			     * NAT in to_external) */

#define CT_F_DNAT 0x1    /* forward: rewrite destination to nat_addr:nat_port */
#define CT_F_REVNAT 0x2  /* reply: rewrite source to nat_addr:nat_port */
#define CT_F_CLOSING 0x4 /* FIN or RST seen: a new SYN starts a new flow */
#define CT_F_HAIRPIN 0x8 /* a pod reaching itself through a service: the source
			  * is translated to the VIP too, and replies are
			  * translated back in from_pod */
#define CT_F_SNAT 0x10   /* an external flow under externalTrafficPolicy
			  * Cluster: its packets carry SNAT_MARK so the node's
			  * nftables masquerade SNATs them */

/* The mark from_external gives packets of Cluster flows (skb->mark, in the
 * bits of SNAT_MARK_MASK): the agent's nftables table masquerades them in
 * postrouting, so replies come back to this node (gateway/northsouth). */
#define SNAT_MARK 0x1e740000
#define SNAT_MARK_MASK 0xffff0000

/* isth_lb values (struct lb_val.flags). */
#define LB_F_SNAT 0x1  /* externalTrafficPolicy Cluster: the node SNATs */
#define LB_F_LOCAL 0x2 /* externalTrafficPolicy Local: only this node's backends, the client's address kept */
#define LB_F_ADDR 0x4  /* port 0, protocol 0: a known external address (no frontend) */
#define LB_F_NODE 0x8  /* with LB_F_ADDR: one of the node's own addresses, known for
			* its node ports; traffic no node-port frontend takes is
			* the node's own and passes untouched */

#define EP_F_POLICY_INGRESS 0x1
#define EP_F_POLICY_EGRESS 0x2

#define DIR_INGRESS 1
#define DIR_EGRESS 2

#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2
#define IDENTITY_REMOTE_NODE 6 /* another node of the own cluster */

enum reason {
	REASON_FORWARD_STACK = 0,
	REASON_FORWARD_LOCAL = 1,
	REASON_SERVICE_NAT = 2,
	REASON_DROP_POLICY_EGRESS = 3,
	REASON_DROP_POLICY_INGRESS = 4,
	REASON_DROP_NO_BACKEND = 5,
	REASON_DROP_INVALID = 6,
	REASON_DROP_SPOOFED = 7,
	REASON_DROP_UNKNOWN_DEST = 8,
	REASON_DELIVERED = 9,
	REASON_DROP_FRAG_UNKNOWN = 10,   /* a non-first fragment whose first fragment was not seen */
	REASON_DROP_EXT_HEADER = 11,     /* IPv6 extension header chain unknown or too long */
	REASON_DROP_ICMP_UNRELATED = 12, /* ICMP error about no flow of the pod it claims */
	REASON_DROP_NO_FRONTEND = 13,    /* from outside to a known external address, on a port without a frontend */
	REASON_EXTERNAL_IN = 14,         /* from outside to a frontend, translated to its backend */
	REASON_EXTERNAL_OUT = 15,        /* a reply of a flow from outside, translated back */
	REASON_MAX = 16,
};

struct ipcache_key {
	__u32 prefixlen; /* over addr, IPv4 prefixes are 96 + len */
	union addr addr;
};

struct ipcache_val {
	__u32 identity;
	__u32 flags;
	union addr host; /* node hosting the address, zero if local/unknown */
};

struct ep_key {
	union addr addr;
};

struct ep_val {
	__u32 id;
	__u32 ifindex; /* host-side veth */
	__u32 identity;
	__u32 flags;
	__u8 pod_mac[6];
	__u8 host_mac[6];
};

struct svc_key {
	union addr vip;
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 pad;
};

struct svc_val {
	__u32 id;    /* keys the backends map */
	__u32 count; /* backends in slots 1..count */
};

/* isth_lb: a frontend at a load-balancer or external address, or a node port
 * at one of the node's addresses (the key is svc_key; port 0 and protocol 0
 * mark the address itself as known). */
struct lb_val {
	__u32 id;    /* keys the backends map (IDs shared with isth_services) */
	__u32 count; /* backends in slots 1..count */
	__u32 flags; /* LB_F_* */
	__u32 pad;
};

struct be_key {
	__u32 svc_id;
	__u32 slot;
};

struct be_val {
	union addr addr;
	__u16 port; /* host byte order */
	__u16 pad;
	__u32 cluster_id;
};

struct pol_key {
	__u32 ep_id;
	__u32 identity; /* 0: any */
	__u16 port;     /* host byte order, 0: any */
	__u8 proto;     /* 0: any */
	__u8 dir;
};

struct pol_val {
	__u32 flags;
};

struct ct_key {
	union addr src;
	union addr dst;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 proto;
	__u8 scope;
	__u16 pad;
};

struct ct_val {
	__u64 created;   /* bpf_ktime_get_ns */
	__u64 last_seen; /* refreshed at most once a second */
	union addr nat_addr;
	__u16 nat_port;
	__u16 flags;
	__u32 pad;
};

struct metric_val {
	__u64 packets;
	__u64 bytes;
};

#define FRAG_HOOK_FROM_POD 1
#define FRAG_HOOK_TO_POD 2
#define FRAG_HOOK_FROM_EXT 3
#define FRAG_HOOK_TO_EXT 4

/* A fragmented datagram, as its fragments arrive at one hook. */
struct frag_key {
	union addr src;
	union addr dst;
	__u32 id;    /* IPv4 identification or IPv6 fragment header identification */
	__u8 proto;  /* IPv4 protocol, or the next header of the IPv6 fragment header */
	__u8 hook;   /* FRAG_HOOK_* */
	__u16 pad;
};

/* What happened to the first fragment: later ones get the same. */
struct frag_val {
	__u64 created;   /* bpf_ktime_get_ns of the first fragment */
	union addr src;  /* the addresses the first fragment left with (after translation) */
	union addr dst;
	__u16 sport;     /* its ports as it arrived (host byte order) */
	__u16 dport;
	__u32 verdict;   /* 0: forwarded; else the reason it was dropped */
};
