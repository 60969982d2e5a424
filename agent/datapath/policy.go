package datapath

import (
	"fmt"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// addPolicy writes the compiled entries the map lacks, keeping the ones it
// has (they go in prunePolicy, once no endpoint relies on them). It returns
// what the map held before. An error stops the run: without the new
// entries, switching enforcement on would drop allowed traffic.
func (r *Reconciler) addPolicy(compiled policy.Result, res *Result) ([]bpf.PolicyKey, error) {
	have, err := r.dp.PolicyList()
	if err != nil {
		return nil, err
	}
	haveSet := make(map[bpf.PolicyKey]bool, len(have))
	union := slices.Clone(have)
	for _, k := range have {
		haveSet[k] = true
	}
	for _, k := range compiled.Keys {
		if !haveSet[k] {
			union = append(union, k)
			res.Policy++
		}
	}
	if len(union) > len(have) {
		if err := r.dp.PolicySync(union); err != nil {
			return nil, fmt.Errorf("add policy entries: %w", err)
		}
	}
	return have, nil
}

// prunePolicy removes the entries of have that are no longer compiled.
func (r *Reconciler) prunePolicy(have []bpf.PolicyKey, compiled policy.Result, res *Result) {
	want := make(map[bpf.PolicyKey]bool, len(compiled.Keys))
	for _, k := range compiled.Keys {
		want[k] = true
	}
	stale := 0
	for _, k := range have {
		if !want[k] {
			stale++
		}
	}
	if stale == 0 {
		return
	}
	if err := r.dp.PolicySync(compiled.Keys); err != nil {
		res.Errs = append(res.Errs, fmt.Errorf("remove policy entries: %w", err))
	} else {
		res.Policy += stale
	}
}
