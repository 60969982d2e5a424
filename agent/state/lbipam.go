package state

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// LBIPAMFile holds LB-IPAM's assignments: in standalone mode the ones the
// agent's allocator made (so addresses stick across restarts), in cluster
// mode a copy of the cluster's (so an agent restarted while etcd is away
// keeps serving its load-balancer addresses).
const LBIPAMFile = "lbipam.json"

type lbipamFile struct {
	Version     int                    `json:"version"`
	Assignments []records.LBAssignment `json:"assignments"`
}

// LBAssignments reads the stored assignments (none without the file).
// Each is validated as an etcd record would be; a file that does not
// parse or holds an invalid one is an error naming the file.
func (s *Store) LBAssignments() ([]records.LBAssignment, error) {
	var f lbipamFile
	path := s.path(LBIPAMFile)
	found, err := readJSON(path, &f)
	if err != nil || !found {
		return nil, err
	}
	if f.Version != fileVersion {
		return nil, fmt.Errorf("state file %s: version %d not supported (this build reads %d)", path, f.Version, fileVersion)
	}
	seen := map[string]bool{}
	for _, a := range f.Assignments {
		if err := a.Validate(); err != nil {
			return nil, fmt.Errorf("state file %s is corrupt (%v): fix or move it away; the agent will not overwrite it", path, err)
		}
		key := a.Namespace + "/" + a.Name
		if seen[key] {
			return nil, fmt.Errorf("state file %s is corrupt (two assignments of %s): fix or move it away; the agent will not overwrite it", path, key)
		}
		seen[key] = true
	}
	return f.Assignments, nil
}

// SaveLBAssignments replaces the stored assignments (sorted by service).
func (s *Store) SaveLBAssignments(as []records.LBAssignment) error {
	as = slices.Clone(as)
	slices.SortFunc(as, func(a, b records.LBAssignment) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	// One record per line, each encoded on its own: MarshalIndent of the
	// whole scanned and indented it all again, most of what an agent spent
	// keeping this copy of 10,000 assignments.
	b := fmt.Appendf(nil, "{\n  \"version\": %d,\n  \"assignments\": [", fileVersion)
	s.mu.Lock()
	defer s.mu.Unlock()
	lines := make(map[string]lbLine, len(as))
	for i := range as {
		as[i].Version = records.CurrentVersion
		key := as[i].Namespace + "/" + as[i].Name
		l, ok := s.lbLines[key]
		if !ok || !sameAssignment(l.rec, as[i]) {
			// Only what changed since the last save is validated and
			// encoded again: 10,000 of them every 2 s of a bulk apply
			// cost an agent a tenth of its time.
			if err := as[i].Validate(); err != nil {
				return fmt.Errorf("store LB-IPAM assignments: %w", err)
			}
			raw, err := json.Marshal(as[i])
			if err != nil {
				return fmt.Errorf("store LB-IPAM assignments: %w", err)
			}
			l = lbLine{rec: as[i], line: raw}
			l.rec.Addresses = slices.Clone(l.rec.Addresses) // the caller's may change
		}
		lines[key] = l
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, "\n    "...)
		b = append(b, l.line...)
	}
	if len(as) > 0 {
		b = append(b, "\n  "...)
	}
	b = append(b, "]\n}\n"...)
	if err := WriteFileAtomic(s.path(LBIPAMFile), b, 0o600); err != nil {
		return err
	}
	s.lbLines = lines
	return nil
}

// lbLine is an assignment as SaveLBAssignments encoded it.
type lbLine struct {
	rec  records.LBAssignment
	line []byte
}

func sameAssignment(a, b records.LBAssignment) bool {
	return a.Version == b.Version && a.Namespace == b.Namespace && a.Name == b.Name && a.Refused == b.Refused && slices.Equal(a.Addresses, b.Addresses)
}
