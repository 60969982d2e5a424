package main

import (
	"fmt"
	"io"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// printBigTCP writes the BIG TCP section of the status: the setting, each
// path per family (on, or why not), the node's external devices and each
// endpoint's veth.
func printBigTCP(w io.Writer, s *api.BigTCPStatus) error {
	v4 := s.IPv4
	if !s.IPv4Supported {
		v4 += " (kernel without IPv4 BIG TCP)"
	}
	fmt.Fprintf(w, "BIG TCP: ipv6 %s, ipv4 %s, size %d\n", s.IPv6, v4, s.Size)
	t := newTable(w)
	fmt.Fprintln(t, "  PATH\tFAMILY\tBIG TCP\tWHY NOT")
	for _, p := range s.Paths {
		on := "off"
		if p.On {
			on = "on"
		}
		fmt.Fprintf(t, "  %s\t%s\t%s\t%s\n", p.Path, p.Family, on, orNone(p.Reason))
	}
	if err := t.Flush(); err != nil {
		return err
	}
	t = newTable(w)
	fmt.Fprintln(t, "  DEVICE\tROLE\tTSO MAX\tIPV6 GSO/GRO\tIPV4 GSO/GRO\tNOTE")
	for _, d := range s.Devices {
		if d.Endpoint != "" {
			continue
		}
		fmt.Fprintf(t, "  %s\t%s\t%d\t%d/%d\t%d/%d\t%s\n", d.Name, d.Role, d.TSOMax, d.GSO, d.GRO, d.GSOIPv4, d.GROIPv4, orNone(d.Reason))
	}
	if err := t.Flush(); err != nil {
		return err
	}
	t = newTable(w)
	if len(s.Endpoints) > 0 {
		fmt.Fprintln(t, "  ENDPOINT\tIPV6 GSO/GRO\tIPV4 GSO/GRO\tNOTE")
		for _, e := range s.Endpoints {
			fmt.Fprintf(t, "  %s\t%d\t%d\t%s\n", e.Endpoint, e.IPv6, e.IPv4, orNone(e.Reason))
		}
	}
	if s.LastError != "" {
		fmt.Fprintf(t, "  Error:\t%s\n", s.LastError)
	}
	return t.Flush()
}
