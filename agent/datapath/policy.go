package datapath

import (
	"fmt"

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

// addPolicy writes the entries of want the map lacks, keeping the ones it
// has (they go in removePolicy, once no endpoint relies on them). An error
// stops the run: without the new entries, switching enforcement on would
// drop allowed traffic.
func (r *Reconciler) addPolicy(want []bpf.PolicyKey, res *Result) error {
	have, err := r.policyShadow()
	if err != nil {
		return err
	}
	var add []bpf.PolicyKey
	for _, k := range want {
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

// prunePolicy removes the entries the map has that want lacks.
func (r *Reconciler) prunePolicy(want map[bpf.PolicyKey]struct{}, res *Result) {
	var stale []bpf.PolicyKey
	for k := range r.polShadow {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	r.removePolicy(stale, res)
}

// removePolicy removes the entries of stale from the map (those it has).
func (r *Reconciler) removePolicy(stale []bpf.PolicyKey, res *Result) {
	var del []bpf.PolicyKey
	for _, k := range stale {
		if _, ok := r.polShadow[k]; ok {
			del = append(del, k)
		}
	}
	if len(del) == 0 {
		return
	}
	if err := r.dp.PolicyUpdate(nil, del); err != nil {
		r.polShadow = nil
		res.Errs = append(res.Errs, fmt.Errorf("remove policy entries: %w", err))
		return
	}
	for _, k := range del {
		delete(r.polShadow, k)
	}
	res.Policy += len(del)
}
