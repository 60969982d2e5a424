package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// printNorthSouth prints the way in from outside: the external devices
// and whether the programs are attached (or why not), and the SNAT table.
func printNorthSouth(w io.Writer, s *api.NorthSouthStatus) error {
	snat := "not needed (no frontend under externalTrafficPolicy Cluster)"
	switch {
	case s.SNATPresent:
		snat = "nftables table inet " + s.Table + " in place"
	case s.SNATError != "":
		snat = "missing: " + s.SNATError
	case s.SNATWanted:
		snat = "missing"
	}
	fmt.Fprintf(w, "North-south: %d frontends (Cluster %d, Local %d) on %d external addresses; SNAT: %s\n",
		s.FrontendsCluster+s.FrontendsLocal, s.FrontendsCluster, s.FrontendsLocal, s.Addresses, snat)
	t := newTable(w)
	fmt.Fprintln(t, "  DEVICE\tROLES\tATTACHED\tWHY NOT")
	for _, d := range s.Devices {
		att := "no"
		if d.Attached {
			att = "yes"
		}
		fmt.Fprintf(t, "  %s\t%s\t%s\t%s\n", d.Name, strings.Join(d.Roles, ","), att, orNone(d.Reason))
	}
	if err := t.Flush(); err != nil {
		return err
	}
	if s.Error != "" {
		fmt.Fprintf(w, "  error: %s\n", s.Error)
	}
	return nil
}
