// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Isthmus pod datapath.
 *
 * from_pod runs at tcx ingress of the host-side veth (packets leaving a pod):
 * egress policy, service translation, conntrack, and direct delivery to local
 * pods with bpf_redirect_peer. to_pod runs at tcx egress of the host-side veth
 * (packets the kernel routes to a pod): ingress policy and reverse NAT.
 * Both follow a datagram's later fragments by its first (isth_frag), walk
 * IPv6 extension headers to the real L4 header, and tail-call
 * from_pod_icmp_err / to_pod_icmp_err for ICMP errors, which pass only when
 * they quote a flow of the pod (docs/datapath.md, "Fragments, extension
 * headers and ICMP errors").
 *
 * from_host and to_host do the same on the L3 WireGuard device of an
 * external workload, whose own address is its endpoint (docs/datapath.md,
 * "The host of an external workload").
 *
 * from_external and to_external run at tcx ingress and egress of the node's
 * external devices: traffic from outside the mesh to a load-balancer or
 * external address is translated to a backend (isth_lb), and its replies
 * back (docs/datapath.md, "Traffic from outside the mesh"). Everything else
 * passes untouched.
 */
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "datapath.h"

/* linux/icmp.h drags in libc socket headers; the echo layout is all we need. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
		__be32 gateway;
	} un;
};
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

/* IPv6 extension headers (linux/in6.h pulls in libc headers too). */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
#define NEXTHDR_MOBILITY 135
#define NEXTHDR_HIP 139
#define NEXTHDR_SHIM6 140
#define NEXTHDR_EXP1 253
#define NEXTHDR_EXP2 254

/* At most this many IPv6 extension headers, ending at most this far into the
 * frame; a longer chain is dropped (REASON_DROP_EXT_HEADER). */
#define IPV6_MAX_EXT_HDRS 8
#define IPV6_MAX_L4_OFF 512

/* A first fragment's verdict serves its datagram's later fragments for this
 * long (the kernel's reassembly timeout for IPv6; IPv4's is 30 s). */
#define FRAG_TIMEOUT_NS (60ULL * 1000000000ULL)

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_val);
	__uint(max_entries, 512 * 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ep_key);
	__type(value, struct ep_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct be_key);
	__type(value, struct be_val);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_backends SEC(".maps");

/* Frontends at load-balancer and external addresses, for traffic from
 * outside the mesh (from_external); their backends are in isth_backends
 * under IDs of their own. Port 0 and protocol 0: the address itself. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct lb_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_lb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct pol_key);
	__type(value, struct pol_val);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_val);
	__uint(max_entries, 16384);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_frag SEC(".maps");

/* ICMP errors are judged in programs of their own, reached by tail call, so
 * their work has a stack of its own and costs the other packets nothing. The
 * agent fills the slots when it loads the programs (bpf.Open). */
#define CALL_FROM_POD_ICMP_ERR 0
#define CALL_TO_POD_ICMP_ERR 1

/* skb->cb[0] of a packet tail-called into the ICMP error programs: CB_L3
 * when it comes from from_host or to_host (no Ethernet header), anything
 * else from the pod programs, which write 0. */
#define CB_L3 0x15e30003

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metric_val);
	__uint(max_entries, REASON_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} isth_metrics SEC(".maps");

/* A parsed packet: the 5-tuple plus where to find its headers. */
struct pkt {
	union addr src;
	union addr dst;
	__u16 sport; /* host byte order; ICMP echo id in sport (request) or dport (reply) */
	__u16 dport;
	__u8 proto;  /* the real L4 protocol, behind any IPv6 extension headers */
	__u8 family; /* 4 or 6 */
	__u8 has_ports; /* TCP or UDP: ports are real and rewritable */
	__u8 tcp_flags;
	__u32 l4_off;
	__u32 frag_id;   /* fragment identification (FRAG_FIRST, FRAG_LATER) */
	__u8 frag;       /* FRAG_NONE, FRAG_FIRST or FRAG_LATER */
	__u8 frag_proto; /* the protocol that keys the fragment map */
	__u8 l3_off;     /* where the IP header starts: ETH_HLEN, or 0 on an L3 device */
	__u8 pad;
};

#define FRAG_NONE 0
#define FRAG_FIRST 1 /* offset 0, more fragments follow: carries the L4 header */
#define FRAG_LATER 2 /* offset > 0: no L4 header */

/* The packet quoted by an ICMP error. */
struct inner {
	union addr src;
	union addr dst;
	__u16 sport; /* as in struct pkt */
	__u16 dport;
	__u8 proto;
	__u8 has_ports;
	__u8 l4_csum; /* the quoted TCP/UDP checksum field is inside the packet */
	__u8 pad;
	__u32 ip_off; /* offset of the quoted IP header */
	__u32 l4_off; /* offset of the quoted L4 header */
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

enum parse_result {
	PARSE_OK = 0,
	PARSE_PASS = 1,     /* not ours to judge (ARP, neighbour discovery, link-local, multicast) */
	PARSE_INVALID = 2,  /* truncated or malformed */
	PARSE_EXT = 3,      /* IPv6 extension header chain unknown or too long */
	PARSE_ICMP_ERR = 4, /* an ICMP or ICMPv6 error: judged by the flow it quotes */
};

static __always_inline void count(__u32 reason, __u32 bytes)
{
	struct metric_val *m = bpf_map_lookup_elem(&isth_metrics, &reason);
	if (m) {
		m->packets++;
		m->bytes += bytes;
	}
}

static __always_inline void addr_from_v4(union addr *a, __be32 ip)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = ip;
}

static __always_inline int ipv6_is_ext(__u8 nh)
{
	switch (nh) {
	case NEXTHDR_HOP:
	case NEXTHDR_ROUTING:
	case NEXTHDR_FRAGMENT:
	case NEXTHDR_AUTH:
	case NEXTHDR_DEST:
	case NEXTHDR_MOBILITY:
	case NEXTHDR_HIP:
	case NEXTHDR_SHIM6:
	case NEXTHDR_EXP1:
	case NEXTHDR_EXP2:
		return 1;
	}
	return 0;
}

/* Where an IPv6 extension header chain ends. */
struct v6walk {
	__u32 off;     /* the L4 header (or, for FRAG_LATER, the fragment's data) */
	__u32 frag_id;
	__u8 nh;       /* the L4 protocol */
	__u8 frag;     /* FRAG_* */
	__u8 frag_nh;  /* next header of the fragment header */
	__u8 pad;
};

/* Walks the extension headers from off (nh: the first next header), at most
 * IPV6_MAX_EXT_HDRS of them: hop-by-hop (only first), routing, destination
 * options, authentication and fragment headers. A non-first fragment stops
 * the walk (its L4 header is in the first fragment). Mobility, HIP, shim6 and
 * the experimental types are not walked: PARSE_EXT, as for a longer chain. */
static __noinline int ipv6_walk(struct __sk_buff *skb, __u32 off, __u8 nh, struct v6walk *w)
{
	__u8 h[8];
	int seen_frag = 0;

	w->frag = FRAG_NONE;
	w->frag_id = 0;
	w->frag_nh = 0;
	for (int i = 0; i <= IPV6_MAX_EXT_HDRS; i++) {
		if (!ipv6_is_ext(nh)) {
			w->off = off;
			w->nh = nh;
			return PARSE_OK;
		}
		if (i == IPV6_MAX_EXT_HDRS || off > IPV6_MAX_L4_OFF)
			return PARSE_EXT;
		switch (nh) {
		case NEXTHDR_HOP:
			if (i != 0)
				return PARSE_EXT;
			/* fallthrough */
		case NEXTHDR_ROUTING:
		case NEXTHDR_DEST:
			if (bpf_skb_load_bytes(skb, off, h, 2) < 0)
				return PARSE_INVALID;
			nh = h[0];
			off += ((__u32)h[1] + 1) * 8;
			break;
		case NEXTHDR_AUTH:
			if (bpf_skb_load_bytes(skb, off, h, 2) < 0)
				return PARSE_INVALID;
			nh = h[0];
			off += ((__u32)h[1] + 2) * 4;
			break;
		case NEXTHDR_FRAGMENT: {
			if (seen_frag)
				return PARSE_EXT; /* a second fragment header */
			seen_frag = 1;
			if (bpf_skb_load_bytes(skb, off, h, 8) < 0)
				return PARSE_INVALID;
			__u16 fo = ((__u16)h[2] << 8) | h[3];
			nh = h[0];
			w->frag_nh = nh;
			w->frag_id = ((__u32)h[4] << 24) | ((__u32)h[5] << 16) | ((__u32)h[6] << 8) | h[7];
			off += 8;
			if (fo & 0xfff8) {
				w->frag = FRAG_LATER;
				w->off = off;
				w->nh = nh;
				return PARSE_OK;
			}
			/* Offset 0 without "more fragments" is an atomic
			 * fragment: a whole datagram. */
			if (fo & 1)
				w->frag = FRAG_FIRST;
			break;
		}
		default:
			return PARSE_EXT; /* mobility, HIP, shim6, experimental */
		}
	}
	return PARSE_EXT;
}

/* Parses a packet whose IP header starts after an Ethernet header (l3 0:
 * the veths, the external devices) or at the start of the data (l3 1: an L3
 * device, the WireGuard tun device of an external workload, which carries
 * only IP). On an L3 device the version nibble says the family: it agrees
 * with skb->protocol there, and unlike skb->protocol it is what
 * BPF_PROG_TEST_RUN (which derives skb->protocol from an Ethernet header
 * it assumes) runs the tests with too. l3 is a constant in every caller. */
static __always_inline int parse_at(struct __sk_buff *skb, struct pkt *p, int l3)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l3_off = l3 ? 0 : ETH_HLEN;
	__be16 proto;

	if (l3) {
		__u8 *v = data;
		if ((void *)(v + 1) > data_end)
			return PARSE_INVALID;
		if ((*v >> 4) == 4)
			proto = bpf_htons(ETH_P_IP);
		else if ((*v >> 4) == 6)
			proto = bpf_htons(ETH_P_IPV6);
		else
			return PARSE_PASS;
	} else {
		struct ethhdr *eth = data;
		if ((void *)(eth + 1) > data_end)
			return PARSE_INVALID;
		proto = eth->h_proto;
	}

	p->frag = FRAG_NONE;
	p->l3_off = l3_off;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l3_off;
		if ((void *)(ip + 1) > data_end)
			return PARSE_INVALID;
		if (ip->ihl < 5 || ip->version != 4)
			return PARSE_INVALID;
		p->family = 4;
		p->proto = ip->protocol;
		addr_from_v4(&p->src, ip->saddr);
		addr_from_v4(&p->dst, ip->daddr);
		p->l4_off = l3_off + ip->ihl * 4;
		/* Multicast and broadcast stay on the link. */
		if ((bpf_ntohl(ip->daddr) >> 28) == 0xe || ip->daddr == 0xffffffff)
			return PARSE_PASS;
		/* Fragments: the first carries the L4 header, later ones none. */
		if (ip->frag_off & bpf_htons(0x3fff)) {
			p->frag = (ip->frag_off & bpf_htons(0x1fff)) ? FRAG_LATER : FRAG_FIRST;
			p->frag_id = bpf_ntohs(ip->id);
			p->frag_proto = ip->protocol;
		}
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + l3_off;
		if ((void *)(ip6 + 1) > data_end)
			return PARSE_INVALID;
		p->family = 6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->src.b, ip6->saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(p->dst.b, ip6->daddr.in6_u.u6_addr8, 16);
		p->l4_off = l3_off + sizeof(struct ipv6hdr);
		/* Link-local sources and multicast destinations (MLD reports behind
		 * a hop-by-hop header, router solicitations) stay on the link. */
		if ((p->src.b[0] == 0xfe && (p->src.b[1] & 0xc0) == 0x80) || p->dst.b[0] == 0xff)
			return PARSE_PASS;
		if (ipv6_is_ext(p->proto)) {
			struct v6walk w;
			int r = ipv6_walk(skb, p->l4_off, p->proto, &w);
			if (r != PARSE_OK)
				return r;
			if (w.off > IPV6_MAX_L4_OFF)
				return PARSE_EXT;
			p->proto = w.nh;
			p->l4_off = w.off;
			p->frag = w.frag;
			p->frag_id = w.frag_id;
			p->frag_proto = w.frag_nh;
		}
	} else {
		return PARSE_PASS;
	}

	p->sport = 0;
	p->dport = 0;
	p->has_ports = 0;
	p->tcp_flags = 0;
	if (p->frag == FRAG_LATER)
		return PARSE_OK;

	__u32 l4_off = p->l4_off;
	if (l4_off > IPV6_MAX_L4_OFF)
		return PARSE_INVALID;
	void *l4 = data + l4_off;
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return PARSE_INVALID;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->has_ports = 1;
		p->tcp_flags = ((__u8 *)th)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return PARSE_INVALID;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->has_ports = 1;
		break;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *ih = l4;
		if (p->family != 4)
			break;
		if ((void *)(ih + 1) > data_end)
			return PARSE_INVALID;
		switch (ih->type) {
		case ICMP_ECHO:
			p->sport = bpf_ntohs(ih->un.echo.id);
			break;
		case ICMP_ECHOREPLY:
			p->dport = bpf_ntohs(ih->un.echo.id);
			break;
		case ICMP_DEST_UNREACH:
		case ICMP_SOURCE_QUENCH:
		case ICMP_TIME_EXCEEDED:
		case ICMP_PARAMETERPROB:
			return PARSE_ICMP_ERR;
		default:
			return PARSE_PASS;
		}
		break;
	}
	case IPPROTO_ICMPV6: {
		struct icmp6hdr *ih = l4;
		if (p->family != 6)
			break;
		if ((void *)(ih + 1) > data_end)
			return PARSE_INVALID;
		switch (ih->icmp6_type) {
		case ICMPV6_ECHO_REQUEST:
			p->sport = bpf_ntohs(ih->icmp6_dataun.u_echo.identifier);
			break;
		case ICMPV6_ECHO_REPLY:
			p->dport = bpf_ntohs(ih->icmp6_dataun.u_echo.identifier);
			break;
		case ICMPV6_DEST_UNREACH:
		case ICMPV6_PKT_TOOBIG:
		case ICMPV6_TIME_EXCEED:
		case ICMPV6_PARAMPROB:
			return PARSE_ICMP_ERR;
		default:
			return PARSE_PASS; /* neighbour discovery, MLD */
		}
		break;
	}
	}
	return PARSE_OK;
}

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	return parse_at(skb, p, 0);
}

/* Parses the packet an ICMP error quotes (right after the 8-byte ICMP
 * header): its addresses, protocol and ports (or echo identifier). Returns
 * -1 when there is no flow to relate it to: truncated, not IP of the outer
 * family, a non-first fragment, or an ICMP message other than echo. */
static __always_inline int parse_inner(struct __sk_buff *skb, const struct pkt *p, struct inner *in)
{
	__u32 off = p->l4_off + 8;
	__u8 l4[8];

	in->ip_off = off;
	in->sport = 0;
	in->dport = 0;
	in->has_ports = 0;
	in->l4_csum = 0;
	if (p->family == 4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return -1;
		if (ip.version != 4 || ip.ihl < 5 || (ip.frag_off & bpf_htons(0x1fff)))
			return -1;
		addr_from_v4(&in->src, ip.saddr);
		addr_from_v4(&in->dst, ip.daddr);
		in->proto = ip.protocol;
		in->l4_off = off + ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;
		struct v6walk w;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return -1;
		if (ip6.version != 6)
			return -1;
		__builtin_memcpy(in->src.b, ip6.saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(in->dst.b, ip6.daddr.in6_u.u6_addr8, 16);
		if (ipv6_walk(skb, off + sizeof(ip6), ip6.nexthdr, &w) != PARSE_OK || w.frag == FRAG_LATER)
			return -1;
		in->proto = w.nh;
		in->l4_off = w.off;
	}
	switch (in->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		if (bpf_skb_load_bytes(skb, in->l4_off, l4, 8) < 0)
			return -1;
		in->sport = ((__u16)l4[0] << 8) | l4[1];
		in->dport = ((__u16)l4[2] << 8) | l4[3];
		in->has_ports = 1;
		in->l4_csum = in->proto == IPPROTO_UDP || in->l4_off + 18 <= skb->len;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if ((in->proto == IPPROTO_ICMP) != (p->family == 4))
			break;
		if (bpf_skb_load_bytes(skb, in->l4_off, l4, 8) < 0)
			return -1;
		if (l4[0] == (p->family == 4 ? ICMP_ECHO : ICMPV6_ECHO_REQUEST))
			in->sport = ((__u16)l4[4] << 8) | l4[5];
		else if (l4[0] == (p->family == 4 ? ICMP_ECHOREPLY : ICMPV6_ECHO_REPLY))
			in->dport = ((__u16)l4[4] << 8) | l4[5];
		else
			return -1; /* errors are never about errors */
		break;
	}
	return 0;
}

static __always_inline int addr_eq(const union addr *a, const union addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

static __always_inline __u32 lookup_identity(const union addr *a)
{
	struct ipcache_key k = { .prefixlen = 128 };
	k.addr = *a;
	struct ipcache_val *v = bpf_map_lookup_elem(&isth_ipcache, &k);
	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline int policy_try(struct pol_key *k)
{
	return bpf_map_lookup_elem(&isth_policy, k) != NULL;
}

/* Allow rules only; the most specific entry is tried first, then wildcards:
 * port, protocol, identity. */
static __always_inline int policy_allows(__u32 ep_id, __u32 identity, __u16 port, __u8 proto, __u8 dir)
{
	struct pol_key k = { .ep_id = ep_id, .identity = identity, .port = port, .proto = proto, .dir = dir };
	if (policy_try(&k))
		return 1;
	k.port = 0;
	if (policy_try(&k))
		return 1;
	k.proto = 0;
	if (policy_try(&k))
		return 1;
	k.identity = 0;
	k.port = port;
	k.proto = proto;
	if (policy_try(&k))
		return 1;
	k.port = 0;
	if (policy_try(&k))
		return 1;
	k.proto = 0;
	return policy_try(&k);
}

static __always_inline void ct_key_fwd(struct ct_key *k, const struct pkt *p, __u8 scope)
{
	k->src = p->src;
	k->dst = p->dst;
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->scope = scope;
	k->pad = 0;
}

static __always_inline void ct_key_rev(struct ct_key *k, const struct pkt *p, __u8 scope)
{
	k->src = p->dst;
	k->dst = p->src;
	k->sport = p->dport;
	k->dport = p->sport;
	k->proto = p->proto;
	k->scope = scope;
	k->pad = 0;
}

static __always_inline int is_new_syn(const struct pkt *p)
{
	return p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Looks up a flow and keeps its bookkeeping current. A SYN that hits a flow
 * already closing is a new connection reusing the tuple: report a miss. */
static __always_inline struct ct_val *ct_lookup(struct ct_key *k, const struct pkt *p)
{
	struct ct_val *v = bpf_map_lookup_elem(&isth_ct, k);
	if (!v)
		return NULL;
	if ((v->flags & CT_F_CLOSING) && is_new_syn(p))
		return NULL;
	__u64 now = bpf_ktime_get_ns();
	if (now - v->last_seen > 1000000000ULL)
		v->last_seen = now;
	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) && !(v->flags & CT_F_CLOSING))
		v->flags |= CT_F_CLOSING;
	return v;
}

static __always_inline void ct_create(struct ct_key *k, __u16 flags, const union addr *nat, __u16 nat_port)
{
	struct ct_val v = {};
	v.created = bpf_ktime_get_ns();
	v.last_seen = v.created;
	v.flags = flags;
	if (nat) {
		v.nat_addr = *nat;
		v.nat_port = nat_port;
	}
	bpf_map_update_elem(&isth_ct, k, &v, BPF_ANY);
}

/* Rewrites the source (is_src) or destination address and port of the packet,
 * fixing the IPv4 header checksum and the L4 checksum (pseudo header). */
static __always_inline int rewrite(struct __sk_buff *skb, struct pkt *p, int is_src, const union addr *na, __u16 nport)
{
	__u32 csum_off = 0;
	__u64 mangle0 = 0;
	union addr *old = is_src ? &p->src : &p->dst;

	/* Non-first fragments (has_ports 0) carry no L4 header to fix. */
	if (!p->has_ports) {
	} else if (p->proto == IPPROTO_TCP) {
		csum_off = p->l4_off + offsetof(struct tcphdr, check);
	} else if (p->proto == IPPROTO_UDP) {
		csum_off = p->l4_off + offsetof(struct udphdr, check);
		if (p->family == 4)
			mangle0 = BPF_F_MARK_MANGLED_0;
	}

	if (p->family == 4) {
		__be32 oldip = old->w[3], newip = na->w[3];
		__u32 off = p->l3_off + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		if (csum_off && bpf_l4_csum_replace(skb, csum_off, oldip, newip, BPF_F_PSEUDO_HDR | mangle0 | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), oldip, newip, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, off, &newip, 4, 0) < 0)
			return -1;
	} else {
		__u32 off = p->l3_off + (is_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
		if (csum_off) {
			__s64 diff = bpf_csum_diff(old->w, 16, (void *)na->w, 16, 0);
			if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangle0) < 0)
				return -1;
		}
		if (bpf_skb_store_bytes(skb, off, (void *)na->b, 16, 0) < 0)
			return -1;
	}
	*old = *na;

	if (p->has_ports) {
		__u16 *oldport = is_src ? &p->sport : &p->dport;
		if (*oldport != nport) {
			__be16 o = bpf_htons(*oldport), n = bpf_htons(nport);
			__u32 off = p->l4_off + (is_src ? 0 : 2);
			if (csum_off && bpf_l4_csum_replace(skb, csum_off, o, n, mangle0 | 2) < 0)
				return -1;
			if (bpf_skb_store_bytes(skb, off, &n, 2, 0) < 0)
				return -1;
			*oldport = nport;
		}
	}
	return 0;
}

/* A new flow into a local pod: its ingress policy, then conntrack. Not
 * inlined: its stack would add to the established path's. */
static __noinline int to_pod_new_flow(const struct pkt *p, __u32 ep_id, __u32 ep_flags, __u32 src_identity)
{
	struct ct_key k;

	if (ep_flags & EP_F_POLICY_INGRESS) {
		if (!src_identity)
			src_identity = lookup_identity(&p->src);
		if (!policy_allows(ep_id, src_identity, p->dport, p->proto, DIR_INGRESS))
			return REASON_DROP_POLICY_INGRESS;
	}
	ct_key_fwd(&k, p, CT_SCOPE_INGRESS);
	ct_create(&k, 0, NULL, 0);
	return REASON_DELIVERED;
}

/* The checks a packet passes on its way into a local pod, wherever it came
 * from: replies to the pod's own flows (reverse NAT where the flow went
 * through a service), established inbound flows, or a new inbound flow that
 * the pod's ingress policy must allow. src_identity 0 means "look it up". */
static __always_inline int to_pod_checks(struct __sk_buff *skb, struct pkt *p, const struct ep_val *dep, __u32 src_identity)
{
	struct ct_key k;
	struct ct_val *v;

	ct_key_rev(&k, p, CT_SCOPE_EGRESS);
	v = ct_lookup(&k, p);
	if (v) {
		if ((v->flags & (CT_F_REVNAT | CT_F_HAIRPIN)) == CT_F_REVNAT) {
			union addr na = v->nat_addr;
			if (rewrite(skb, p, 1, &na, v->nat_port) < 0)
				return REASON_DROP_INVALID;
		}
		return REASON_DELIVERED;
	}

	ct_key_fwd(&k, p, CT_SCOPE_INGRESS);
	if (ct_lookup(&k, p))
		return REASON_DELIVERED;
	return to_pod_new_flow(p, dep->id, dep->flags, src_identity);
}

static __always_inline int drop(__u32 reason, __u32 len)
{
	count(reason, len);
	return TC_ACT_SHOT;
}

/* One's complement arithmetic on raw (network order, as loaded) 16-bit
 * words, for checksums of bytes the helpers do not know about: the packet an
 * ICMP error quotes (RFC 1624: HC' = ~(~HC + ~m + m')). */
static __always_inline __u32 csum_delta16(__u32 sum, __u16 from, __u16 to)
{
	return sum + (__u16)~from + to;
}

static __always_inline __u32 csum_delta32(__u32 sum, __u32 from, __u32 to)
{
	sum = csum_delta16(sum, from & 0xffff, to & 0xffff);
	return csum_delta16(sum, from >> 16, to >> 16);
}

static __always_inline __u16 csum_update(__u16 check, __u32 delta)
{
	__u64 s = (__u16)~check + (__u64)delta;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

static __always_inline void ct_key_set(struct ct_key *k, const union addr *src, const union addr *dst, __u16 sport, __u16 dport, __u8 proto, __u8 scope)
{
	k->src = *src;
	k->dst = *dst;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->scope = scope;
	k->pad = 0;
}

/* Translates an ICMP error about a service flow: the quoted packet's source
 * (inner_src) or destination address and port become the flow's NAT address
 * and port (v), with the
 * quoted IPv4 header checksum, the quoted TCP/UDP checksum (when quoted) and
 * the ICMP checksum fixed. The outer address on the other side (destination
 * for inner_src, else source) is translated too when it is the same address,
 * that is when the error comes from (or goes to) the translated peer itself;
 * an error from a router keeps the router's address. */
static __always_inline int icmp_err_xlate(struct __sk_buff *skb, struct pkt *p, struct inner *in, int inner_src, const struct ct_val *v)
{
	const union addr *na = &v->nat_addr;
	union addr *old = inner_src ? &in->src : &in->dst;
	union addr *outer = inner_src ? &p->dst : &p->src;
	int outer_too = addr_eq(outer, old);
	__u16 oldport = inner_src ? in->sport : in->dport;
	__u16 nport = v->nat_port;
	__u32 addr_delta = 0, icmp_delta, port_delta;
	__u16 c, nc;

	if (p->family == 4) {
		__u32 aoff = in->ip_off + (inner_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		__u32 coff = in->ip_off + offsetof(struct iphdr, check);
		addr_delta = csum_delta32(0, old->w[3], na->w[3]);
		if (bpf_skb_load_bytes(skb, coff, &c, 2) < 0)
			return -1;
		nc = csum_update(c, addr_delta);
		icmp_delta = csum_delta16(addr_delta, c, nc);
		if (bpf_skb_store_bytes(skb, aoff, &na->w[3], 4, BPF_F_RECOMPUTE_CSUM) < 0 ||
		    bpf_skb_store_bytes(skb, coff, &nc, 2, BPF_F_RECOMPUTE_CSUM) < 0)
			return -1;
		if (outer_too) {
			__u32 ooff = p->l3_off + (inner_src ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
			if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), old->w[3], na->w[3], 4) < 0 ||
			    bpf_skb_store_bytes(skb, ooff, &na->w[3], 4, BPF_F_RECOMPUTE_CSUM) < 0)
				return -1;
		}
	} else {
		__u32 aoff = in->ip_off + (inner_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
		addr_delta = csum_delta32(addr_delta, old->w[0], na->w[0]);
		addr_delta = csum_delta32(addr_delta, old->w[1], na->w[1]);
		addr_delta = csum_delta32(addr_delta, old->w[2], na->w[2]);
		addr_delta = csum_delta32(addr_delta, old->w[3], na->w[3]);
		icmp_delta = addr_delta;
		if (bpf_skb_store_bytes(skb, aoff, na->b, 16, BPF_F_RECOMPUTE_CSUM) < 0)
			return -1;
		if (outer_too) {
			__u32 ooff = p->l3_off + (inner_src ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
			if (bpf_skb_store_bytes(skb, ooff, na->b, 16, BPF_F_RECOMPUTE_CSUM) < 0)
				return -1;
			icmp_delta += addr_delta; /* the ICMPv6 pseudo header */
		}
	}

	nc = bpf_htons(nport);
	port_delta = csum_delta16(0, bpf_htons(oldport), nc);
	icmp_delta += port_delta;
	if (bpf_skb_store_bytes(skb, in->l4_off + (inner_src ? 0 : 2), &nc, 2, BPF_F_RECOMPUTE_CSUM) < 0)
		return -1;
	if (in->l4_csum) {
		__u32 l4c_off = in->l4_off + (in->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
		if (bpf_skb_load_bytes(skb, l4c_off, &c, 2) < 0)
			return -1;
		/* An IPv4 UDP checksum of 0 means none. */
		if (c != 0 || in->proto == IPPROTO_TCP) {
			nc = csum_update(c, addr_delta + port_delta);
			if (in->proto == IPPROTO_UDP && nc == 0)
				nc = 0xffff;
			icmp_delta = csum_delta16(icmp_delta, c, nc);
			if (bpf_skb_store_bytes(skb, l4c_off, &nc, 2, BPF_F_RECOMPUTE_CSUM) < 0)
				return -1;
		}
	}

	if (bpf_skb_load_bytes(skb, p->l4_off + 2, &c, 2) < 0)
		return -1;
	nc = csum_update(c, icmp_delta);
	if (bpf_skb_store_bytes(skb, p->l4_off + 2, &nc, 2, BPF_F_RECOMPUTE_CSUM) < 0)
		return -1;
	if (outer_too)
		*outer = *na;
	*old = *na;
	if (inner_src)
		in->sport = nport;
	else
		in->dport = nport;
	return 0;
}

/* An ICMP error on its way into a local pod (the outer destination). The
 * pod must have sent the quoted packet, in a flow it has: one it opened
 * (egress scope; through a service, the error is translated back to the
 * service address the pod knows) or one that entered it (ingress scope, the
 * quoted packet then is a reply). Anything else is dropped. */
static __always_inline int icmp_err_to_pod(struct __sk_buff *skb, struct pkt *p, struct inner *in)
{
	struct ct_key k;
	struct ct_val *v;

	if (!addr_eq(&in->src, &p->dst))
		return REASON_DROP_ICMP_UNRELATED;
	ct_key_set(&k, &in->src, &in->dst, in->sport, in->dport, in->proto, CT_SCOPE_EGRESS);
	v = bpf_map_lookup_elem(&isth_ct, &k);
	if (v) {
		if ((v->flags & (CT_F_REVNAT | CT_F_HAIRPIN)) == CT_F_REVNAT && in->has_ports) {
			if (icmp_err_xlate(skb, p, in, 0, v) < 0)
				return REASON_DROP_INVALID;
		}
		return REASON_DELIVERED;
	}
	ct_key_set(&k, &in->dst, &in->src, in->dport, in->sport, in->proto, CT_SCOPE_INGRESS);
	if (bpf_map_lookup_elem(&isth_ct, &k))
		return REASON_DELIVERED;
	return REASON_DROP_ICMP_UNRELATED;
}

/* An ICMP error a pod sends (the outer source). A pod reports only packets
 * it received, in a flow it has: one that entered it (ingress scope) or one
 * it opened (egress scope, the quoted packet is a reply; when that flow went
 * through a service, the error is translated to the backend). */
static __always_inline int icmp_err_from_pod(struct __sk_buff *skb, struct pkt *p, struct inner *in)
{
	struct ct_key k;
	struct ct_val *v;

	if (!addr_eq(&in->dst, &p->src))
		return REASON_DROP_ICMP_UNRELATED;
	ct_key_set(&k, &in->src, &in->dst, in->sport, in->dport, in->proto, CT_SCOPE_INGRESS);
	if (bpf_map_lookup_elem(&isth_ct, &k))
		return REASON_FORWARD_STACK;
	ct_key_set(&k, &in->dst, &in->src, in->dport, in->sport, in->proto, CT_SCOPE_EGRESS);
	v = bpf_map_lookup_elem(&isth_ct, &k);
	if (!v)
		return REASON_DROP_ICMP_UNRELATED;
	if ((v->flags & (CT_F_DNAT | CT_F_HAIRPIN)) == CT_F_DNAT && in->has_ports) {
		if (icmp_err_xlate(skb, p, in, 1, v) < 0)
			return REASON_DROP_INVALID;
	}
	return REASON_FORWARD_STACK;
}

static __always_inline void frag_key_init(struct frag_key *k, const struct pkt *p, __u8 hook)
{
	k->src = p->src;
	k->dst = p->dst;
	k->id = p->frag_id;
	k->proto = p->frag_proto;
	k->hook = hook;
	k->pad = 0;
}

/* A first fragment: creates its datagram's entry, keyed by the addresses it
 * arrived with, and returns it for frag_done (NULL if the map refused). The
 * verdict starts as a drop, so a later fragment that races the first one's
 * processing is not let through unjudged. */
static __noinline struct frag_val *frag_first(const struct pkt *p, __u8 hook)
{
	struct frag_key k;
	struct frag_val v = {};
	frag_key_init(&k, p, hook);
	v.created = bpf_ktime_get_ns();
	v.sport = p->sport;
	v.dport = p->dport;
	v.verdict = REASON_DROP_FRAG_UNKNOWN;
	if (bpf_map_update_elem(&isth_frag, &k, &v, BPF_ANY) < 0)
		return NULL;
	return bpf_map_lookup_elem(&isth_frag, &k);
}

/* Records the first fragment's fate (reason: forwarded, delivered or the
 * drop) and the addresses it left with. */
static __always_inline void frag_done(struct frag_val *v, const struct pkt *p, __u32 reason)
{
	v->src = p->src;
	v->dst = p->dst;
	if (reason == REASON_FORWARD_STACK || reason == REASON_FORWARD_LOCAL || reason == REASON_DELIVERED)
		v->verdict = 0;
	else
		v->verdict = reason;
}

/* A non-first fragment: the verdict and translation of its first fragment,
 * addresses only (the ports are in the first fragment). Returns the reason. */
static __noinline int frag_later(struct __sk_buff *skb, struct pkt *p, __u8 hook)
{
	struct frag_key k;
	frag_key_init(&k, p, hook);
	struct frag_val *v = bpf_map_lookup_elem(&isth_frag, &k);
	if (!v || bpf_ktime_get_ns() - v->created > FRAG_TIMEOUT_NS)
		return REASON_DROP_FRAG_UNKNOWN;
	if (v->verdict)
		return v->verdict;
	union addr ns = v->src, nd = v->dst;
	if (!addr_eq(&ns, &p->src) && rewrite(skb, p, 1, &ns, 0) < 0)
		return REASON_DROP_INVALID;
	if (!addr_eq(&nd, &p->dst) && rewrite(skb, p, 0, &nd, 0) < 0)
		return REASON_DROP_INVALID;
	return REASON_DELIVERED;
}

/* Writes the MACs a frame from the destination's host-side veth would carry;
 * the caller redirects it into the destination pod. */
static __always_inline int set_macs(struct __sk_buff *skb, const struct ep_val *d)
{
	__u8 macs[12];
	__builtin_memcpy(macs, d->pod_mac, 6);
	__builtin_memcpy(macs + 6, d->host_mac, 6);
	return bpf_skb_store_bytes(skb, 0, macs, 12, 0);
}

/* A node port reached from a pod: the services map holds it at the
 * unspecified address of the family (0.0.0.0 or ::), which stands for
 * every node's addresses, so a pod reaches <any node's address>:<node port>
 * without an entry per node. Only a destination the ipcache knows as a
 * node's (this node's: host; the own cluster's others: remote-node) takes
 * it; the cheap hash lookup comes first, the ipcache only on a hit. sk is
 * the caller's key, reused. */
static __always_inline struct svc_val *nodeport_lookup(const struct pkt *p, struct svc_key *sk)
{
	__builtin_memset(&sk->vip, 0, sizeof(sk->vip));
	if (p->family == 4)
		sk->vip.w[2] = bpf_htonl(0xffff);
	struct svc_val *sv = bpf_map_lookup_elem(&isth_services, sk);
	if (!sv)
		return NULL;
	__u32 id = lookup_identity(&p->dst);
	if (id != IDENTITY_HOST && id != IDENTITY_REMOTE_NODE)
		return NULL;
	return sv;
}

/* A new flow leaving a pod: service translation first, so that policy
 * judges the backend actually reached, then egress policy and conntrack.
 * Returns REASON_FORWARD_STACK to go on to delivery, or the drop. Not
 * inlined: its stack would add to the established path's. */
static __noinline int from_pod_new_flow(struct __sk_buff *skb, struct pkt *p, __u32 src_identity, __u32 src_ep_id, __u32 src_flags)
{
	__u32 len = skb->len;
	struct ct_key k;

	union addr orig_dst = p->dst;
	__u16 orig_dport = p->dport;
	int nat = 0;
	struct be_val be;
	if (p->has_ports) {
		struct svc_key sk2 = { .vip = p->dst, .port = p->dport, .proto = p->proto };
		struct svc_val *sv = bpf_map_lookup_elem(&isth_services, &sk2);
		if (!sv)
			sv = nodeport_lookup(p, &sk2);
		if (sv) {
			if (sv->count == 0)
				return REASON_DROP_NO_BACKEND;
			struct be_key bk = { .svc_id = sv->id, .slot = bpf_get_prandom_u32() % sv->count + 1 };
			struct be_val *bv = bpf_map_lookup_elem(&isth_backends, &bk);
			if (!bv)
				return REASON_DROP_NO_BACKEND;
			be = *bv;
			nat = 1;
		}
	}

	union addr new_dst = nat ? be.addr : p->dst;
	__u16 new_dport = nat ? be.port : p->dport;
	int hairpin = nat && addr_eq(&be.addr, &p->src);

	/* Conntrack will admit the hairpin flow into the pod, so the pod's
	 * ingress policy judges it here, against the pod's own identity. */
	if (hairpin && (src_flags & EP_F_POLICY_INGRESS) &&
	    !policy_allows(src_ep_id, src_identity, new_dport, p->proto, DIR_INGRESS))
		return REASON_DROP_POLICY_INGRESS;

	if (src_flags & EP_F_POLICY_EGRESS) {
		__u32 dst_identity = lookup_identity(&new_dst);
		if (!policy_allows(src_ep_id, dst_identity, new_dport, p->proto, DIR_EGRESS))
			return REASON_DROP_POLICY_EGRESS;
	}

	ct_key_fwd(&k, p, CT_SCOPE_EGRESS);
	if (hairpin) {
		ct_create(&k, CT_F_DNAT | CT_F_HAIRPIN, &new_dst, new_dport);
		if (rewrite(skb, p, 0, &new_dst, new_dport) < 0 || rewrite(skb, p, 1, &orig_dst, p->sport) < 0)
			return REASON_DROP_INVALID;
		/* Now VIP:cport -> pod:bport; its replies leave the pod as
		 * pod:bport -> VIP:cport and are matched in step one above. */
		ct_key_rev(&k, p, CT_SCOPE_EGRESS);
		ct_create(&k, CT_F_REVNAT | CT_F_HAIRPIN, &orig_dst, orig_dport);
		count(REASON_SERVICE_NAT, len);
	} else if (nat) {
		ct_create(&k, CT_F_DNAT, &new_dst, new_dport);
		if (rewrite(skb, p, 0, &new_dst, new_dport) < 0)
			return REASON_DROP_INVALID;
		/* The translated flow remembers the frontend for replies. */
		ct_key_fwd(&k, p, CT_SCOPE_EGRESS);
		ct_create(&k, CT_F_REVNAT, &orig_dst, orig_dport);
		count(REASON_SERVICE_NAT, len);
	} else {
		ct_create(&k, 0, NULL, 0);
	}

	return REASON_FORWARD_STACK;
}

/* from_pod for a packet of a flow (not an ICMP error, not a later
 * fragment). Returns REASON_FORWARD_STACK, REASON_FORWARD_LOCAL (redirect
 * to *ifindex) or the reason to drop. */
static __always_inline int from_pod_flow(struct __sk_buff *skb, struct pkt *p, __u32 src_identity, __u32 src_ep_id, __u32 src_flags, __u32 *ifindex, int l3)
{
	struct ct_key k;
	struct ct_val *v;
	int r;

	/* An established flow of this pod. */
	ct_key_fwd(&k, p, CT_SCOPE_EGRESS);
	v = ct_lookup(&k, p);
	if (v) {
		union addr na = v->nat_addr;
		__u16 np = v->nat_port;
		__u16 flags = v->flags;
		if (flags & CT_F_DNAT) {
			union addr vip = p->dst;
			if (rewrite(skb, p, 0, &na, np) < 0)
				return REASON_DROP_INVALID;
			if ((flags & CT_F_HAIRPIN) && rewrite(skb, p, 1, &vip, p->sport) < 0)
				return REASON_DROP_INVALID;
		} else if ((flags & (CT_F_REVNAT | CT_F_HAIRPIN)) == (CT_F_REVNAT | CT_F_HAIRPIN)) {
			/* A hairpin reply, pod:bport -> VIP:cport: back to VIP:vport -> pod:cport. */
			union addr self = p->src;
			if (rewrite(skb, p, 1, &na, np) < 0 || rewrite(skb, p, 0, &self, p->dport) < 0)
				return REASON_DROP_INVALID;
		}
		goto deliver;
	}

	/* A reply to a flow that entered this pod. */
	ct_key_rev(&k, p, CT_SCOPE_INGRESS);
	if (ct_lookup(&k, p))
		goto deliver;

	/* A new flow. */
	r = from_pod_new_flow(skb, p, src_identity, src_ep_id, src_flags);
	if (r != REASON_FORWARD_STACK)
		return r;

deliver:
	/* The host's own traffic (from_host) always goes on to WireGuard: the
	 * host has no local pods. */
	if (l3)
		return REASON_FORWARD_STACK;
	struct ep_key dk = { .addr = p->dst };
	struct ep_val *dep = bpf_map_lookup_elem(&isth_endpoints, &dk);
	if (!dep)
		return REASON_FORWARD_STACK;
	struct ep_val d = *dep;
	r = to_pod_checks(skb, p, &d, src_identity);
	if (r != REASON_DELIVERED)
		return r;

	/* Straight into the destination pod: the frame must look as if the
	 * destination's host-side veth had sent it. */
	if (set_macs(skb, &d) < 0)
		return REASON_DROP_INVALID;
	*ifindex = d.ifindex;
	return REASON_FORWARD_LOCAL;
}

/* The end of from_pod: count and act on the reason. */
static __always_inline int from_pod_done(int r, __u32 ifindex, __u32 len)
{
	if (r == REASON_FORWARD_LOCAL) {
		count(r, len);
		return bpf_redirect_peer(ifindex, 0);
	}
	if (r == REASON_FORWARD_STACK) {
		count(r, len);
		return TC_ACT_OK;
	}
	return drop(r, len);
}

/* Delivery of a packet from_pod does not run through from_pod_flow (ICMP
 * errors, later fragments): into a local pod, or to the stack. */
static __always_inline int from_pod_deliver(struct __sk_buff *skb, struct pkt *p, struct inner *in, __u32 *ifindex)
{
	struct ep_key dk = { .addr = p->dst };
	struct ep_val *dep = bpf_map_lookup_elem(&isth_endpoints, &dk);
	if (!dep)
		return REASON_FORWARD_STACK;
	struct ep_val d = *dep;
	if (in) {
		int r = icmp_err_to_pod(skb, p, in);
		if (r != REASON_DELIVERED)
			return r;
	}
	if (set_macs(skb, &d) < 0)
		return REASON_DROP_INVALID;
	*ifindex = d.ifindex;
	return REASON_FORWARD_LOCAL;
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 len = skb->len;
	__u32 ifindex = 0;
	int r = parse(skb, &p);

	if (r == PARSE_PASS) {
		count(REASON_FORWARD_STACK, len);
		return TC_ACT_OK;
	}
	if (r == PARSE_INVALID)
		return drop(REASON_DROP_INVALID, len);
	if (r == PARSE_EXT)
		return drop(REASON_DROP_EXT_HEADER, len);

	struct ep_key sk = { .addr = p.src };
	struct ep_val *sep = bpf_map_lookup_elem(&isth_endpoints, &sk);
	if (!sep)
		return drop(REASON_DROP_SPOOFED, len);

	if (r == PARSE_ICMP_ERR) {
		skb->cb[0] = 0;
		bpf_tail_call(skb, &isth_calls, CALL_FROM_POD_ICMP_ERR);
		return drop(REASON_DROP_ICMP_UNRELATED, len); /* slot empty: unjudged */
	}
	if (p.frag == FRAG_LATER) {
		r = frag_later(skb, &p, FRAG_HOOK_FROM_POD);
		if (r == REASON_DELIVERED)
			r = from_pod_deliver(skb, &p, NULL, &ifindex);
		return from_pod_done(r, ifindex, len);
	}

	/* A first fragment: its entry, keyed as it arrived, takes its fate
	 * for the later ones. */
	struct frag_val *fv = NULL;
	if (p.frag == FRAG_FIRST)
		fv = frag_first(&p, FRAG_HOOK_FROM_POD);
	r = from_pod_flow(skb, &p, sep->identity, sep->id, sep->flags, &ifindex, 0);
	if (fv)
		frag_done(fv, &p, r);
	return from_pod_done(r, ifindex, len);
}

/* to_pod, and to_host on an L3 device (l3 1). */
static __always_inline int to_pod_at(struct __sk_buff *skb, int l3)
{
	struct pkt p = {};
	__u32 len = skb->len;
	int r = parse_at(skb, &p, l3);

	if (r == PARSE_PASS)
		return TC_ACT_OK;
	if (r == PARSE_INVALID)
		return drop(REASON_DROP_INVALID, len);
	if (r == PARSE_EXT)
		return drop(REASON_DROP_EXT_HEADER, len);

	struct ep_key dk = { .addr = p.dst };
	struct ep_val *dep = bpf_map_lookup_elem(&isth_endpoints, &dk);
	if (!dep)
		return TC_ACT_OK; /* link-local and multicast to the pod; on a host, its node traffic */

	if (r == PARSE_ICMP_ERR) {
		skb->cb[0] = l3 ? CB_L3 : 0;
		bpf_tail_call(skb, &isth_calls, CALL_TO_POD_ICMP_ERR);
		return drop(REASON_DROP_ICMP_UNRELATED, len); /* slot empty: unjudged */
	}
	if (p.frag == FRAG_LATER) {
		r = frag_later(skb, &p, FRAG_HOOK_TO_POD);
	} else {
		struct ep_val d = *dep;
		struct frag_val *fv = NULL;
		if (p.frag == FRAG_FIRST)
			fv = frag_first(&p, FRAG_HOOK_TO_POD);
		r = to_pod_checks(skb, &p, &d, 0);
		if (fv)
			frag_done(fv, &p, r);
	}
	if (r != REASON_DELIVERED)
		return drop(r, len);
	count(REASON_DELIVERED, len);
	return TC_ACT_OK;
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	return to_pod_at(skb, 0);
}

/* An ICMP error leaving a pod (tail call from from_pod, which checked the
 * source): related to a flow of the sender, then delivered like from_pod
 * delivers, with the destination's side checked too. From from_host
 * (cb[0] CB_L3): related to a flow of the host, then on to WireGuard. */
SEC("tc")
int from_pod_icmp_err(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct inner in;
	__u32 len = skb->len;
	__u32 ifindex = 0;
	int l3 = skb->cb[0] == CB_L3;

	if ((l3 ? parse_at(skb, &p, 1) : parse_at(skb, &p, 0)) != PARSE_ICMP_ERR)
		return drop(REASON_DROP_INVALID, len);
	if (parse_inner(skb, &p, &in) < 0)
		return drop(REASON_DROP_ICMP_UNRELATED, len);
	int r = icmp_err_from_pod(skb, &p, &in);
	if (r == REASON_FORWARD_STACK && !l3)
		r = from_pod_deliver(skb, &p, &in, &ifindex);
	return from_pod_done(r, ifindex, len);
}

/* An ICMP error on its way into a pod (tail call from to_pod), or into
 * the host (from to_host). */
SEC("tc")
int to_pod_icmp_err(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct inner in;
	__u32 len = skb->len;
	int l3 = skb->cb[0] == CB_L3;

	if ((l3 ? parse_at(skb, &p, 1) : parse_at(skb, &p, 0)) != PARSE_ICMP_ERR)
		return drop(REASON_DROP_INVALID, len);
	if (parse_inner(skb, &p, &in) < 0)
		return drop(REASON_DROP_ICMP_UNRELATED, len);
	int r = icmp_err_to_pod(skb, &p, &in);
	if (r != REASON_DELIVERED)
		return drop(r, len);
	count(REASON_DELIVERED, len);
	return TC_ACT_OK;
}

/* ---- The host's own datapath (an external workload, docs/vms.md) ----
 *
 * An enrolled host's address lives on its WireGuard device, an L3 (tun)
 * device: everything the host exchanges with the mesh leaves and arrives
 * there, unencrypted on this side. The device plays the part of a pod's
 * host-side veth, the host the part of the pod: from_host at tcx egress
 * (what the host sends) does what from_pod does (conntrack, service
 * translation to a backend anywhere in the mesh, egress policy when the
 * endpoint's flag asks for it), to_host at tcx ingress (what arrives for
 * the host) what to_pod does (reverse NAT of service replies, ingress
 * policy). The packets have no Ethernet header (parse_at l3), nothing is
 * redirected: the host has no local pods. Packets from or to an address
 * that is not the host's endpoint (the host's node traffic to its peers'
 * node addresses) pass untouched. */

SEC("tc")
int from_host(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 len = skb->len;
	__u32 ifindex = 0;
	int r = parse_at(skb, &p, 1);

	if (r == PARSE_PASS) {
		count(REASON_FORWARD_STACK, len);
		return TC_ACT_OK;
	}
	struct ep_key sk = { .addr = p.src };
	struct ep_val *sep = bpf_map_lookup_elem(&isth_endpoints, &sk);
	if (!sep)
		return TC_ACT_OK;
	if (r == PARSE_INVALID)
		return drop(REASON_DROP_INVALID, len);
	if (r == PARSE_EXT)
		return drop(REASON_DROP_EXT_HEADER, len);
	if (r == PARSE_ICMP_ERR) {
		skb->cb[0] = CB_L3;
		bpf_tail_call(skb, &isth_calls, CALL_FROM_POD_ICMP_ERR);
		return drop(REASON_DROP_ICMP_UNRELATED, len); /* slot empty: unjudged */
	}
	if (p.frag == FRAG_LATER) {
		r = frag_later(skb, &p, FRAG_HOOK_FROM_POD);
		if (r == REASON_DELIVERED)
			r = REASON_FORWARD_STACK;
		return from_pod_done(r, 0, len);
	}
	struct frag_val *fv = NULL;
	if (p.frag == FRAG_FIRST)
		fv = frag_first(&p, FRAG_HOOK_FROM_POD);
	r = from_pod_flow(skb, &p, sep->identity, sep->id, sep->flags, &ifindex, 1);
	if (fv)
		frag_done(fv, &p, r);
	return from_pod_done(r, 0, len);
}

SEC("tc")
int to_host(struct __sk_buff *skb)
{
	return to_pod_at(skb, 1);
}

/* ---- Traffic from outside the mesh (north-south) ----
 *
 * from_external runs at tcx ingress of the node's external devices, where
 * all of the node's traffic arrives: only packets to a known external
 * address (isth_lb, port 0) are its business, everything else passes
 * untouched at the cost of one lookup. A new flow to a frontend is
 * translated to a backend (DNAT) and tracked in scope CT_SCOPE_EXTERNAL
 * twice: the client's tuple (the backend it picked) and the backend's reply
 * tuple (the frontend to restore), which to_external, at tcx egress of the
 * same devices, finds on the replies. Under externalTrafficPolicy Cluster
 * the packets carry SNAT_MARK: the node's nftables table masquerades them,
 * so the replies of remote backends come back through this node, whose
 * kernel conntrack undoes the SNAT before to_external undoes the DNAT. A
 * packet to a known address that no frontend takes is dropped, never
 * routed back out (the address is not the node's: the kernel would forward
 * it along the default route, towards where it came from). */

static __always_inline void snat_mark(struct __sk_buff *skb)
{
	__u32 m = (skb->mark & ~SNAT_MARK_MASK) | SNAT_MARK;
	/* A whole-word store: clang would otherwise write only the upper half,
	 * which the verifier refuses for skb->mark. */
	asm volatile("" : "+r"(m));
	skb->mark = m;
}

/* A packet of a flow from outside to a known external address, or to a
 * node port at one of the node's addresses (node). Returns
 * REASON_EXTERNAL_IN (forward), REASON_FORWARD_STACK (node: the node's own
 * traffic, untouched) or the drop. Not inlined: its stack would add to the
 * pass-through path's. */
static __noinline int from_external_flow(struct __sk_buff *skb, struct pkt *p, int node)
{
	struct ct_key k;
	struct ct_val *v;

	ct_key_fwd(&k, p, CT_SCOPE_EXTERNAL);
	v = ct_lookup(&k, p);
	if (v) {
		union addr na = v->nat_addr;
		__u16 np = v->nat_port;
		__u16 flags = v->flags;
		if ((flags & CT_F_DNAT) && rewrite(skb, p, 0, &na, np) < 0)
			return REASON_DROP_INVALID;
		if (flags & CT_F_SNAT)
			snat_mark(skb);
		return REASON_EXTERNAL_IN;
	}

	if (!p->has_ports)
		return REASON_DROP_NO_FRONTEND; /* echo and other protocols have no frontend */
	struct svc_key fk = { .vip = p->dst, .port = p->dport, .proto = p->proto };
	struct lb_val *lv = bpf_map_lookup_elem(&isth_lb, &fk);
	if (!lv)
		return node ? REASON_FORWARD_STACK : REASON_DROP_NO_FRONTEND;
	/* At a node address only a SYN opens a TCP flow: any other segment
	 * without a flow belongs to the node's own connections (a reply to a
	 * port that happens to be a node port), which the kernel judges. */
	if (node && p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return REASON_FORWARD_STACK;
	if (lv->count == 0)
		return REASON_DROP_NO_BACKEND; /* under Local: no backend on this node */
	__u32 lbflags = lv->flags;
	struct be_key bk = { .svc_id = lv->id, .slot = bpf_get_prandom_u32() % lv->count + 1 };
	struct be_val *bv = bpf_map_lookup_elem(&isth_backends, &bk);
	if (!bv)
		return REASON_DROP_NO_BACKEND;
	struct be_val be = *bv;
	union addr front = p->dst;
	__u16 front_port = p->dport;
	__u16 snat = (lbflags & LB_F_SNAT) ? CT_F_SNAT : 0;

	ct_create(&k, CT_F_DNAT | snat, &be.addr, be.port);
	if (rewrite(skb, p, 0, &be.addr, be.port) < 0)
		return REASON_DROP_INVALID;
	/* The backend's replies, backend:port -> client:port, get the
	 * frontend back in to_external. */
	ct_key_rev(&k, p, CT_SCOPE_EXTERNAL);
	ct_create(&k, CT_F_REVNAT, &front, front_port);
	if (snat)
		snat_mark(skb);
	count(REASON_SERVICE_NAT, skb->len);
	return REASON_EXTERNAL_IN;
}

SEC("tc")
int from_external(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 len = skb->len;
	int r = parse(skb, &p);

	if (r == PARSE_PASS)
		return TC_ACT_OK;
	/* Not to a known external address: the node's own traffic. */
	struct svc_key ak = { .vip = p.dst };
	struct lb_val *av = bpf_map_lookup_elem(&isth_lb, &ak);
	if (!av)
		return TC_ACT_OK;
	/* One of the node's own addresses, known for its node ports: only
	 * what a node-port frontend takes is this program's business;
	 * everything else (malformed, ICMP errors, fragments of no node-port
	 * datagram, other ports) is the node's own traffic, for the kernel. */
	int node = av->flags & LB_F_NODE;
	if (node) {
		if (r != PARSE_OK)
			return TC_ACT_OK;
		if (p.frag == FRAG_LATER) {
			r = frag_later(skb, &p, FRAG_HOOK_FROM_EXT);
			if (r == REASON_DROP_FRAG_UNKNOWN)
				return TC_ACT_OK;
			if (r != REASON_DELIVERED)
				return drop(r, len);
			count(REASON_EXTERNAL_IN, len);
			return TC_ACT_OK;
		}
		if (!p.has_ports)
			return TC_ACT_OK;
		ak.port = p.dport;
		ak.proto = p.proto;
		if (!bpf_map_lookup_elem(&isth_lb, &ak))
			return TC_ACT_OK;
	}

	if (r == PARSE_INVALID)
		return drop(REASON_DROP_INVALID, len);
	if (r == PARSE_EXT)
		return drop(REASON_DROP_EXT_HEADER, len);
	if (r == PARSE_ICMP_ERR)
		return drop(REASON_DROP_ICMP_UNRELATED, len);
	if (p.frag == FRAG_LATER) {
		r = frag_later(skb, &p, FRAG_HOOK_FROM_EXT);
		if (r != REASON_DELIVERED)
			return drop(r, len);
		count(REASON_EXTERNAL_IN, len);
		return TC_ACT_OK;
	}
	struct frag_val *fv = NULL;
	if (p.frag == FRAG_FIRST)
		fv = frag_first(&p, FRAG_HOOK_FROM_EXT);
	r = from_external_flow(skb, &p, node);
	if (fv)
		frag_done(fv, &p, (r == REASON_EXTERNAL_IN || r == REASON_FORWARD_STACK) ? REASON_FORWARD_STACK : r);
	if (r == REASON_FORWARD_STACK)
		return TC_ACT_OK; /* the node's own traffic */
	if (r != REASON_EXTERNAL_IN)
		return drop(r, len);
	count(REASON_EXTERNAL_IN, len);
	return TC_ACT_OK;
}

/* Whether a backend's SYN-ACK (p) answers the external flow its reply
 * entry was made for: the client's entry (front:fport, the frontend) must
 * be open and lead to this backend. A new flow through from_external
 * rewrites that entry before its SYN reaches the backend. */
static __noinline int external_flow_opening(const struct pkt *p, const union addr *front, __u16 fport)
{
	struct ct_key k;
	ct_key_set(&k, &p->dst, front, p->dport, fport, p->proto, CT_SCOPE_EXTERNAL);
	struct ct_val *v = bpf_map_lookup_elem(&isth_ct, &k);
	return v && !(v->flags & CT_F_CLOSING) && addr_eq(&v->nat_addr, &p->src) && v->nat_port == p->sport;
}

/* Replies of flows from outside, on their way out: the backend's address
 * and port become the frontend's again. Anything else passes untouched,
 * including later fragments whose first this program did not translate. */
SEC("tc")
int to_external(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct ct_key k;
	struct ct_val *v;
	__u32 len = skb->len;

	if (parse(skb, &p) != PARSE_OK)
		return TC_ACT_OK;
	if (p.frag == FRAG_LATER) {
		if (frag_later(skb, &p, FRAG_HOOK_TO_EXT) == REASON_DELIVERED)
			count(REASON_EXTERNAL_OUT, len);
		return TC_ACT_OK;
	}
	ct_key_fwd(&k, &p, CT_SCOPE_EXTERNAL);
	v = ct_lookup(&k, &p);
	if (!v || !(v->flags & CT_F_REVNAT))
		return TC_ACT_OK;
	union addr na = v->nat_addr;
	__u16 np = v->nat_port;
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == (TCP_FLAG_SYN | TCP_FLAG_ACK) &&
	    !external_flow_opening(&p, &na, np)) {
		/* The backend answers a connection that did not come through
		 * from_external (the client dialled it directly) on the tuple of
		 * an external flow that closed: the entry is stale. */
		bpf_map_delete_elem(&isth_ct, &k);
		return TC_ACT_OK;
	}
	struct frag_val *fv = NULL;
	if (p.frag == FRAG_FIRST)
		fv = frag_first(&p, FRAG_HOOK_TO_EXT);
	if (rewrite(skb, &p, 1, &na, np) < 0)
		return drop(REASON_DROP_INVALID, len);
	if (fv)
		frag_done(fv, &p, REASON_FORWARD_STACK);
	count(REASON_EXTERNAL_OUT, len);
	return TC_ACT_OK;
}
