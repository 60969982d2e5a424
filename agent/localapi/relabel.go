package localapi

import (
	"context"
	"fmt"
	"maps"
	"strings"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// RelabelEndpoint gives a running endpoint new labels, and so the identity
// of those labels, in place: no new veth, no new addresses, established
// flows keep going (under the policy of the new identity). It is how a
// label changed on a running Kubernetes pod reaches the datapath. An
// endpoint that is gone, or already has these labels, is left alone.
func (h *Handlers) RelabelEndpoint(ctx context.Context, namespace, name string, labels map[string]string) error {
	ctx = context.WithoutCancel(ctx)
	key := state.EndpointKey(namespace, name)
	defer h.endpointLocks.Lock(key)()
	h.mu.Lock()
	e, ok := h.store.Endpoint(namespace, name)
	h.mu.Unlock()
	if !ok || maps.Equal(e.Labels, labels) {
		return nil
	}
	l := identity.Labels(labels).Clone()
	if err := l.Validate(); err != nil {
		return fmt.Errorf("endpoint %s: new labels: %w", key, err)
	}
	for k := range l {
		if strings.HasPrefix(k, reservedLabelPrefix) {
			return fmt.Errorf("endpoint %s: label %q: keys under %s are set by the agent", key, k, reservedLabelPrefix)
		}
	}
	// The identity, without the API lock (in etcd in cluster mode).
	id, err := h.ids.Allocate(ctx, desired.IdentityLabels(h.cluster, namespace, l))
	if err != nil {
		return fmt.Errorf("endpoint %s: allocate identity: %w", key, err)
	}
	h.mu.Lock()
	cur, ok := h.store.Endpoint(namespace, name)
	if !ok || cur.ID != e.ID {
		// Deleted or replaced meanwhile.
		h.mu.Unlock()
		h.releaseIdentity(ctx, id)
		return nil
	}
	old := cur.Identity
	cur.Labels, cur.Identity = l, id
	if err := h.store.PutEndpoint(cur); err != nil {
		h.mu.Unlock()
		h.releaseIdentity(ctx, id)
		return err
	}
	h.mesh.EndpointAddedLocked(cur)
	h.mu.Unlock()
	h.log.Info("endpoint relabelled", "namespace", namespace, "name", name, "labels", l.String(), "identity", id, "oldIdentity", old)
	if err := h.rec.Converge(ctx); err != nil {
		h.log.Warn("datapath not yet updated after a relabel; the loop retries", "endpoint", key, "err", err)
	}
	if old != id {
		h.releaseIdentity(ctx, old)
	}
	return nil
}
