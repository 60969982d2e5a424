// Package bpf owns the Isthmus eBPF datapath: the C sources in c/, the
// bpf2go-generated bindings, typed wrappers for every map (so no other package
// handles raw keys), and attaching the programs to pod veths.
//
// Maps are pinned under <bpffs>/isthmus/<node>/ and reused on restart, and the
// tcx links are pinned next to them, so a restarted agent replaces programs in
// place while traffic keeps flowing.
package bpf

//go:generate go tool bpf2go -tags linux -cc clang -no-strip -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type ipcache_key -type ipcache_val -type ep_key -type ep_val -type svc_key -type svc_val -type lb_val -type be_key -type be_val -type pol_key -type pol_val -type ct_key -type ct_val -type frag_key -type frag_val -type metric_val -target bpfel datapath c/datapath.c
