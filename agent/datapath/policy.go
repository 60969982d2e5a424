package datapath

import (
	"fmt"

	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// policyShadow returns the policy map as last written, listing it when
// the shadow is gone (first run, resync, failed write).
func (r *Reconciler) policyShadow() (map[bpf.PolicyKey]struct{}, error) {
	if r.polShadow == nil {
		have, err := r.dp.PolicyList()
		if err != nil {
			return nil, err
		}
		r.polShadow = make(map[bpf.PolicyKey]struct{}, len(have))
		for _, k := range have {
			r.polShadow[k] = struct{}{}
		}
	}
	return r.polShadow, nil
}

// addPolicy writes the compiled entries the map lacks, keeping the ones it
// has (they go in prunePolicy, once no endpoint relies on them). An error
// stops the run: without the new entries, switching enforcement on would
// drop allowed traffic.
func (r *Reconciler) addPolicy(compiled policy.Result, res *Result) error {
	have, err := r.policyShadow()
	if err != nil {
		return err
	}
	var add []bpf.PolicyKey
	for _, k := range compiled.Keys {
		if _, ok := have[k]; !ok {
			add = append(add, k)
		}
	}
	if len(add) == 0 {
		return nil
	}
	if err := r.dp.PolicyUpdate(add, nil); err != nil {
		r.polShadow = nil // some may have gone in: list again
		return fmt.Errorf("add policy entries: %w", err)
	}
	for _, k := range add {
		have[k] = struct{}{}
	}
	res.Policy += len(add)
	return nil
}

// prunePolicy removes the entries the map has that are no longer compiled.
func (r *Reconciler) prunePolicy(compiled policy.Result, res *Result) {
	want := make(map[bpf.PolicyKey]struct{}, len(compiled.Keys))
	for _, k := range compiled.Keys {
		want[k] = struct{}{}
	}
	var stale []bpf.PolicyKey
	for k := range r.polShadow {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	if len(stale) == 0 {
		return
	}
	if err := r.dp.PolicyUpdate(nil, stale); err != nil {
		r.polShadow = nil
		res.Errs = append(res.Errs, fmt.Errorf("remove policy entries: %w", err))
		return
	}
	for _, k := range stale {
		delete(r.polShadow, k)
	}
	res.Policy += len(stale)
}
