// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Isthmus pod datapath.
 *
 * from_pod runs at tcx ingress of the host-side veth (packets leaving a pod):
 * egress policy, service translation, conntrack, and direct delivery to local
 * pods with bpf_redirect_peer. to_pod runs at tcx egress of the host-side veth
 * (packets the kernel routes to a pod): ingress policy and reverse NAT.
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
#define ICMP_ECHO 8

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
	__u8 proto;
	__u8 family; /* 4 or 6 */
	__u8 has_ports; /* TCP or UDP: ports are real and rewritable */
	__u8 tcp_flags;
	__u32 l4_off;
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

enum parse_result {
	PARSE_OK = 0,
	PARSE_PASS = 1,    /* not ours to judge (ARP, neighbour discovery, ICMP errors) */
	PARSE_INVALID = 2, /* truncated or malformed */
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

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 frag = 0;

	if ((void *)(eth + 1) > data_end)
		return PARSE_INVALID;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return PARSE_INVALID;
		if (ip->ihl < 5 || ip->version != 4)
			return PARSE_INVALID;
		p->family = 4;
		p->proto = ip->protocol;
		addr_from_v4(&p->src, ip->saddr);
		addr_from_v4(&p->dst, ip->daddr);
		p->l4_off = ETH_HLEN + ip->ihl * 4;
		/* Multicast and broadcast stay on the link. */
		if ((bpf_ntohl(ip->daddr) >> 28) == 0xe || ip->daddr == 0xffffffff)
			return PARSE_PASS;
		/* Non-first fragments carry no L4 header. */
		frag = (ip->frag_off & bpf_htons(0x1fff)) != 0;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return PARSE_INVALID;
		p->family = 6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->src.b, ip6->saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(p->dst.b, ip6->daddr.in6_u.u6_addr8, 16);
		p->l4_off = ETH_HLEN + sizeof(struct ipv6hdr);
		/* Link-local sources and multicast destinations (MLD reports behind
		 * a hop-by-hop header, router solicitations) stay on the link. */
		if ((p->src.b[0] == 0xfe && (p->src.b[1] & 0xc0) == 0x80) || p->dst.b[0] == 0xff)
			return PARSE_PASS;
	} else {
		return PARSE_PASS;
	}

	p->sport = 0;
	p->dport = 0;
	p->has_ports = 0;
	p->tcp_flags = 0;
	if (frag)
		return PARSE_OK;

	void *l4 = data + p->l4_off;
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
		if (ih->type == ICMP_ECHO)
			p->sport = bpf_ntohs(ih->un.echo.id);
		else if (ih->type == ICMP_ECHOREPLY)
			p->dport = bpf_ntohs(ih->un.echo.id);
		else
			return PARSE_PASS; /* errors relate to flows we already judged */
		break;
	}
	case IPPROTO_ICMPV6: {
		struct icmp6hdr *ih = l4;
		if (p->family != 6)
			break;
		if ((void *)(ih + 1) > data_end)
			return PARSE_INVALID;
		if (ih->icmp6_type == ICMPV6_ECHO_REQUEST)
			p->sport = bpf_ntohs(ih->icmp6_dataun.u_echo.identifier);
		else if (ih->icmp6_type == ICMPV6_ECHO_REPLY)
			p->dport = bpf_ntohs(ih->icmp6_dataun.u_echo.identifier);
		else
			return PARSE_PASS; /* neighbour discovery, MLD, errors */
		break;
	}
	}
	return PARSE_OK;
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

	if (p->proto == IPPROTO_TCP) {
		csum_off = p->l4_off + offsetof(struct tcphdr, check);
	} else if (p->proto == IPPROTO_UDP) {
		csum_off = p->l4_off + offsetof(struct udphdr, check);
		if (p->family == 4)
			mangle0 = BPF_F_MARK_MANGLED_0;
	}

	if (p->family == 4) {
		__be32 oldip = old->w[3], newip = na->w[3];
		__u32 off = ETH_HLEN + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		if (csum_off && bpf_l4_csum_replace(skb, csum_off, oldip, newip, BPF_F_PSEUDO_HDR | mangle0 | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), oldip, newip, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, off, &newip, 4, 0) < 0)
			return -1;
	} else {
		__u32 off = ETH_HLEN + (is_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
		union addr from = *old, to = *na;
		if (csum_off) {
			__s64 diff = bpf_csum_diff(from.w, 16, to.w, 16, 0);
			if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangle0) < 0)
				return -1;
		}
		if (bpf_skb_store_bytes(skb, off, to.b, 16, 0) < 0)
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

	if (dep->flags & EP_F_POLICY_INGRESS) {
		if (!src_identity)
			src_identity = lookup_identity(&p->src);
		if (!policy_allows(dep->id, src_identity, p->dport, p->proto, DIR_INGRESS))
			return REASON_DROP_POLICY_INGRESS;
	}
	ct_create(&k, 0, NULL, 0);
	return REASON_DELIVERED;
}

static __always_inline int drop(__u32 reason, __u32 len)
{
	count(reason, len);
	return TC_ACT_SHOT;
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 len = skb->len;
	int r = parse(skb, &p);

	if (r == PARSE_INVALID)
		return drop(REASON_DROP_INVALID, len);
	if (r == PARSE_PASS) {
		count(REASON_FORWARD_STACK, len);
		return TC_ACT_OK;
	}

	struct ep_key sk = { .addr = p.src };
	struct ep_val *sep = bpf_map_lookup_elem(&isth_endpoints, &sk);
	if (!sep)
		return drop(REASON_DROP_SPOOFED, len);
	__u32 src_identity = sep->identity;
	__u32 src_ep_id = sep->id;
	__u32 src_flags = sep->flags;

	struct ct_key k;
	struct ct_val *v;

	/* An established flow of this pod. */
	ct_key_fwd(&k, &p, CT_SCOPE_EGRESS);
	v = ct_lookup(&k, &p);
	if (v) {
		union addr na = v->nat_addr;
		__u16 np = v->nat_port;
		__u16 flags = v->flags;
		if (flags & CT_F_DNAT) {
			union addr vip = p.dst;
			if (rewrite(skb, &p, 0, &na, np) < 0)
				return drop(REASON_DROP_INVALID, len);
			if ((flags & CT_F_HAIRPIN) && rewrite(skb, &p, 1, &vip, p.sport) < 0)
				return drop(REASON_DROP_INVALID, len);
		} else if ((flags & (CT_F_REVNAT | CT_F_HAIRPIN)) == (CT_F_REVNAT | CT_F_HAIRPIN)) {
			/* A hairpin reply, pod:bport -> VIP:cport: back to VIP:vport -> pod:cport. */
			union addr self = p.src;
			if (rewrite(skb, &p, 1, &na, np) < 0 || rewrite(skb, &p, 0, &self, p.dport) < 0)
				return drop(REASON_DROP_INVALID, len);
		}
		goto deliver;
	}

	/* A reply to a flow that entered this pod. */
	ct_key_rev(&k, &p, CT_SCOPE_INGRESS);
	if (ct_lookup(&k, &p))
		goto deliver;

	/* A new flow: service translation first, so that policy judges the
	 * backend actually reached. */
	union addr orig_dst = p.dst;
	__u16 orig_dport = p.dport;
	int nat = 0;
	struct be_val be;
	if (p.has_ports) {
		struct svc_key sk2 = { .vip = p.dst, .port = p.dport, .proto = p.proto };
		struct svc_val *sv = bpf_map_lookup_elem(&isth_services, &sk2);
		if (sv) {
			if (sv->count == 0)
				return drop(REASON_DROP_NO_BACKEND, len);
			struct be_key bk = { .svc_id = sv->id, .slot = bpf_get_prandom_u32() % sv->count + 1 };
			struct be_val *bv = bpf_map_lookup_elem(&isth_backends, &bk);
			if (!bv)
				return drop(REASON_DROP_NO_BACKEND, len);
			be = *bv;
			nat = 1;
		}
	}

	union addr new_dst = nat ? be.addr : p.dst;
	__u16 new_dport = nat ? be.port : p.dport;
	int hairpin = nat && addr_eq(&be.addr, &p.src);

	/* Conntrack will admit the hairpin flow into the pod, so the pod's
	 * ingress policy judges it here, against the pod's own identity. */
	if (hairpin && (src_flags & EP_F_POLICY_INGRESS) &&
	    !policy_allows(src_ep_id, src_identity, new_dport, p.proto, DIR_INGRESS))
		return drop(REASON_DROP_POLICY_INGRESS, len);

	if (src_flags & EP_F_POLICY_EGRESS) {
		__u32 dst_identity = lookup_identity(&new_dst);
		if (!policy_allows(src_ep_id, dst_identity, new_dport, p.proto, DIR_EGRESS))
			return drop(REASON_DROP_POLICY_EGRESS, len);
	}

	ct_key_fwd(&k, &p, CT_SCOPE_EGRESS);
	if (hairpin) {
		ct_create(&k, CT_F_DNAT | CT_F_HAIRPIN, &new_dst, new_dport);
		if (rewrite(skb, &p, 0, &new_dst, new_dport) < 0 || rewrite(skb, &p, 1, &orig_dst, p.sport) < 0)
			return drop(REASON_DROP_INVALID, len);
		/* Now VIP:cport -> pod:bport; its replies leave the pod as
		 * pod:bport -> VIP:cport and are matched in step one above. */
		ct_key_rev(&k, &p, CT_SCOPE_EGRESS);
		ct_create(&k, CT_F_REVNAT | CT_F_HAIRPIN, &orig_dst, orig_dport);
		count(REASON_SERVICE_NAT, len);
	} else if (nat) {
		ct_create(&k, CT_F_DNAT, &new_dst, new_dport);
		if (rewrite(skb, &p, 0, &new_dst, new_dport) < 0)
			return drop(REASON_DROP_INVALID, len);
		/* The translated flow remembers the frontend for replies. */
		ct_key_fwd(&k, &p, CT_SCOPE_EGRESS);
		ct_create(&k, CT_F_REVNAT, &orig_dst, orig_dport);
		count(REASON_SERVICE_NAT, len);
	} else {
		ct_create(&k, 0, NULL, 0);
	}

deliver:;
	struct ep_key dk = { .addr = p.dst };
	struct ep_val *dep = bpf_map_lookup_elem(&isth_endpoints, &dk);
	if (!dep) {
		count(REASON_FORWARD_STACK, len);
		return TC_ACT_OK;
	}
	struct ep_val d = *dep;
	r = to_pod_checks(skb, &p, &d, src_identity);
	if (r != REASON_DELIVERED)
		return drop(r, len);

	/* Straight into the destination pod: the frame must look as if the
	 * destination's host-side veth had sent it. */
	__u8 macs[12];
	__builtin_memcpy(macs, d.pod_mac, 6);
	__builtin_memcpy(macs + 6, d.host_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, 12, 0) < 0)
		return drop(REASON_DROP_INVALID, len);
	count(REASON_FORWARD_LOCAL, len);
	return bpf_redirect_peer(d.ifindex, 0);
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 len = skb->len;
	int r = parse(skb, &p);

	if (r == PARSE_INVALID)
		return drop(REASON_DROP_INVALID, len);
	if (r == PARSE_PASS)
		return TC_ACT_OK;

	struct ep_key dk = { .addr = p.dst };
	struct ep_val *dep = bpf_map_lookup_elem(&isth_endpoints, &dk);
	if (!dep)
		return TC_ACT_OK; /* link-local and multicast to the pod */
	struct ep_val d = *dep;

	r = to_pod_checks(skb, &p, &d, 0);
	if (r != REASON_DELIVERED)
		return drop(r, len);
	count(REASON_DELIVERED, len);
	return TC_ACT_OK;
}
