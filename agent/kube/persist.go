package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
)

// stateFile is what StateFile holds: the translated objects by key.
type stateFile struct {
	Services map[string]objects.Service       `json:"services"`
	Policies map[string]objects.NetworkPolicy `json:"policies"`
	// BGP and L2 policies (isthmus.io custom resources), so a restarted
	// agent keeps announcing until its informers have listed.
	BGP map[string]objects.BGPPeeringPolicy     `json:"bgp,omitempty"`
	L2  map[string]objects.L2AnnouncementPolicy `json:"l2,omitempty"`
}

// Load reads the objects the previous run persisted and serves them until
// the informers have listed (a missing file is an empty start). A file
// that does not decode is an error that names it: the agent must not
// start enforcing less than it did.
func (s *Source) Load() error {
	if s.cfg.StateFile == "" {
		return nil
	}
	raw, err := os.ReadFile(s.cfg.StateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var st stateFile
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("kubernetes: %s does not decode: %w (delete it: the objects are listed again from the API server)", s.cfg.StateFile, err)
	}
	objs := desired.Objects{}
	for k, v := range st.Services {
		if !strings.HasPrefix(k, "Service/") {
			return fmt.Errorf("kubernetes: %s: service key %q", s.cfg.StateFile, k)
		}
		objs[k] = &v
	}
	for k, v := range st.Policies {
		if !strings.HasPrefix(k, "NetworkPolicy/") {
			return fmt.Errorf("kubernetes: %s: policy key %q", s.cfg.StateFile, k)
		}
		objs[k] = &v
	}
	for k, v := range st.BGP {
		if !strings.HasPrefix(k, objects.KindBGPPeeringPolicy+"/") {
			return fmt.Errorf("kubernetes: %s: BGP policy key %q", s.cfg.StateFile, k)
		}
		objs[k] = &v
	}
	for k, v := range st.L2 {
		if !strings.HasPrefix(k, objects.KindL2AnnouncementPolicy+"/") {
			return fmt.Errorf("kubernetes: %s: L2 policy key %q", s.cfg.StateFile, k)
		}
		objs[k] = &v
	}
	s.snap.Store(&snapshot{objs: objs, gen: 1})
	return nil
}

func (s *Source) saveLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.save:
		}
		objs, _ := s.Objects()
		st := stateFile{Services: map[string]objects.Service{}, Policies: map[string]objects.NetworkPolicy{},
			BGP: map[string]objects.BGPPeeringPolicy{}, L2: map[string]objects.L2AnnouncementPolicy{}}
		for k, o := range objs {
			switch o := o.(type) {
			case *objects.Service:
				st.Services[k] = *o
			case *objects.NetworkPolicy:
				st.Policies[k] = *o
			case *objects.BGPPeeringPolicy:
				st.BGP[k] = *o
			case *objects.L2AnnouncementPolicy:
				st.L2[k] = *o
			}
		}
		raw, err := json.Marshal(st)
		if err == nil {
			err = atomicfile.Write(s.cfg.StateFile, raw, 0o600)
		}
		if err != nil {
			s.log.Warn("kubernetes: cannot persist the objects", "file", s.cfg.StateFile, "err", err)
		}
		// Bursts of changes cost one write per interval.
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}
