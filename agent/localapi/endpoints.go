package localapi

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
	"github.com/isthmus-mesh/isthmus/agent/ipam"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// Plumber is the pod plumbing of agent/endpoint; tests substitute a fake.
type Plumber interface {
	PrepareNode() error
	CheckNetns(path string) error
	Create(spec endpoint.Spec) (endpoint.Result, error)
	Delete(hostIfName string) error
	Lookup(hostIfName string) (endpoint.Result, error)
	List() ([]string, error)
}

// NetlinkPlumber is the Plumber of agent/endpoint.
type NetlinkPlumber struct{}

func (NetlinkPlumber) PrepareNode() error                              { return endpoint.PrepareNode() }
func (NetlinkPlumber) CheckNetns(p string) error                       { return endpoint.CheckNetns(p) }
func (NetlinkPlumber) Create(s endpoint.Spec) (endpoint.Result, error) { return endpoint.Create(s) }
func (NetlinkPlumber) Delete(n string) error                           { return endpoint.Delete(n) }
func (NetlinkPlumber) Lookup(n string) (endpoint.Result, error)        { return endpoint.Lookup(n) }
func (NetlinkPlumber) List() ([]string, error)                         { return endpoint.List() }

// reservedLabelPrefix marks labels the agent sets itself.
const reservedLabelPrefix = "isthmus.io/"

// AddEndpoint implements api.Backend: validate, allocate addresses and an
// identity, plumb the pod, attach the datapath, persist, and wait for the
// datapath to know the pod. Any failure undoes every step done so far.
//
// An add with a container ID (the CNI plugin's) for an endpoint that
// exists with the same container ID returns it as it is (a repeated ADD);
// one that exists with another container ID is removed first (the pod's
// sandbox was recreated). Without a container ID (the CLI), an existing
// endpoint is a conflict.
func (h *Handlers) AddEndpoint(ctx context.Context, req api.EndpointRequest) (api.Endpoint, error) {
	arrived := time.Now()
	// Once accepted, an add completes or rolls back even if the client goes away.
	ctx = context.WithoutCancel(ctx)
	ns, name := req.Namespace, req.Name
	if ns == "" {
		ns = "default"
	}
	if !desired.DNSLabel(name) {
		return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "endpoint name %q must be a DNS label: lower-case letters, digits and '-', at most 63 characters", name)
	}
	if !desired.DNSLabel(ns) {
		return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "namespace %q must be a DNS label: lower-case letters, digits and '-', at most 63 characters", ns)
	}
	if err := validateContainerID(req.ContainerID); err != nil {
		return api.Endpoint{}, err
	}
	podIf := req.IfName
	if podIf == endpoint.DefaultPodIfName {
		podIf = "" // stored as the default
	}
	if err := validateIfName(podIf); err != nil {
		return api.Endpoint{}, err
	}
	if req.Netns == "" {
		return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "netns path is required (for example /var/run/netns/<name>)")
	}

	if err := h.plumb.CheckNetns(req.Netns); err != nil {
		return api.Endpoint{}, api.WithStatus(http.StatusBadRequest, err)
	}

	// Calls for this endpoint run one after the other; the API lock is
	// held for the local steps only, not while the identity is allocated
	// (in etcd in cluster mode), so other pods' adds and the reads go on.
	key := state.EndpointKey(ns, name)
	defer h.endpointLocks.Lock(key)()

	// A repeated ADD; the endpoint of an older sandbox of the pod.
	var replaced *state.Endpoint
	h.mu.Lock()
	old, ok := h.store.Endpoint(ns, name)
	h.mu.Unlock()
	switch {
	case !ok:
	case req.ContainerID == "" || old.ContainerID == "":
		return api.Endpoint{}, api.Errorf(http.StatusConflict, "endpoint %s already exists", key)
	case old.ContainerID == req.ContainerID:
		if old.PodIfName != podIf {
			return api.Endpoint{}, api.Errorf(http.StatusConflict, "endpoint %s is attached to container %s as %s already; a pod has one interface", key, req.ContainerID, ifNameOrDefault(old.PodIfName))
		}
		return toAPI(old), nil
	default:
		replaced = &old
	}

	phases := phaseTimer{last: arrived}
	labels := identity.Labels(req.Labels).Clone()
	if len(labels) == 0 && h.labelsFor != nil {
		l, err := h.labelsFor(ctx, ns, name, req.PodUID)
		if err != nil {
			// Most likely the pod is not known here yet: the runtime retries.
			return api.Endpoint{}, api.Errorf(http.StatusServiceUnavailable, "labels of pod %s: %v", key, err)
		}
		labels = identity.Labels(l).Clone()
	}
	phases.mark("labels")
	if err := labels.Validate(); err != nil {
		return api.Endpoint{}, api.WithStatus(http.StatusBadRequest, err)
	}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if strings.HasPrefix(k, reservedLabelPrefix) {
			return api.Endpoint{}, api.Errorf(http.StatusBadRequest, "label %q: keys under %s are set by the agent", k, reservedLabelPrefix)
		}
	}
	if replaced != nil {
		h.log.Info("endpoint's pod sandbox was recreated; replacing the endpoint", "namespace", ns, "name", name, "oldContainerID", replaced.ContainerID, "containerID", req.ContainerID)
		h.mu.Lock()
		err := h.removeLocked(ctx, *replaced)
		h.mu.Unlock()
		if err != nil {
			return api.Endpoint{}, fmt.Errorf("replace endpoint %s of container %s: %w", key, replaced.ContainerID, err)
		}
	}

	var undo []func()
	fail := func(err error) (api.Endpoint, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		h.log.Warn("endpoint add failed; rolled back", "namespace", ns, "name", name, "err", err)
		return api.Endpoint{}, err
	}
	owner := ownerOf(ns, name)

	// Local checks under the API lock. The netns stays reserved until the
	// endpoint is in the store or rolled back.
	h.mu.Lock()
	err := h.reserve(key, req.Netns)
	h.mu.Unlock()
	if err != nil {
		return api.Endpoint{}, err
	}
	unreserved := false // guarded by h.mu
	unreserve := func() {
		if !unreserved {
			delete(h.pendingNetns, key)
			unreserved = true
		}
	}
	defer func() {
		h.mu.Lock()
		unreserve()
		h.mu.Unlock()
	}()
	// The identity, without the API lock, allocated while the addresses
	// are and the pod is plumbed: its write (or its round trip to etcd in
	// cluster mode) and theirs do not wait for each other.
	allocatedID := h.allocateIdentity(ctx, desired.IdentityLabels(h.cluster, ns, labels))
	undo = append(undo, func() {
		if id, err := allocatedID(); err == nil {
			h.releaseIdentity(ctx, id)
		}
	})

	// The addresses, without the API lock: the IPAM has its own, and the
	// adds of pods created together share its writes. The write goes on
	// while the veth is plumbed; the endpoint is stored only once the
	// addresses are on disk, so a stored endpoint's addresses survive a
	// restart (a crash before leaves a veth without an endpoint, which
	// the pod's runtime retries or tears down).
	ips, durable, err := h.allocate(owner)
	phases.mark("addresses")
	if err != nil {
		return fail(err)
	}
	go func() { _ = durable() }() // starts the write; the add waits for its result below
	undo = append(undo, func() {
		// A failed write took the addresses back already.
		if durable() == nil {
			h.logErr("release addresses", h.ipam.Release(owner))
		}
	})

	// Plumbing, without the API lock too: the veth and its program belong
	// to this endpoint alone (its lock is held, its addresses and netns
	// reserved), and pods created together plumb side by side.
	hostIf := endpoint.HostIfName(h.node, ns, name)
	// The veth is created with its BIG TCP sizes and its clsact qdisc,
	// and the datapath attaches before its host end goes up (see
	// endpoint.Create).
	sizes, routeMTU := h.bigtcp.VethSizes(h.mtu)
	attached := false
	res, err := h.plumb.Create(endpoint.Spec{NetnsPath: req.Netns, HostIfName: hostIf, PodIfName: podIf, Addrs: ips, MTU: h.mtu,
		Sizes: sizes, IPv6RouteMTU: routeMTU, Clsact: h.dp.ClsactForNewEndpoints(),
		BeforeUp: func(ifindex int) error {
			attached = true
			if err := h.dp.AttachNewEndpoint(hostIf, ifindex); err != nil {
				return fmt.Errorf("attach datapath to %s: %w", hostIf, err)
			}
			return nil
		}})
	if attached {
		undo = append(undo, func() { h.logErr("release datapath", h.dp.ReleaseEndpoint(hostIf)) })
	}
	if err != nil {
		return fail(fmt.Errorf("plumb endpoint %s/%s: %w", ns, name, err))
	}
	undo = append(undo, func() { h.logErr("delete veth", h.plumb.Delete(hostIf)) })
	phases.mark("veth(" + res.Steps + ")")
	// The veth's BIG TCP status, here rather than in a reconcile run
	// (see bigtcp.SizeEndpoint).
	h.bigtcp.SizeEndpoint(state.Endpoint{Name: name, Namespace: ns, NetnsPath: req.Netns, HostIfName: hostIf, IfIndex: res.HostIfIndex, IPs: ips}, res)
	phases.mark("bigtcp")
	id, err := allocatedID()
	phases.mark("identity") // what was left of it
	if err != nil {
		return fail(fmt.Errorf("allocate identity: %w", err))
	}

	if err := durable(); err != nil {
		return fail(fmt.Errorf("store the addresses of %s: %w", key, err))
	}
	phases.mark("addresses-written")

	// The store, without the API lock too: this endpoint's lock keeps its
	// other calls out and its netns stays reserved until the store holds
	// it. The endpoint is in memory at once and its file is written while
	// the datapath loop takes it (see state.StageEndpoint): the add
	// answers only when both are done, so an answered add is durable, and
	// a crash before leaves no file, so the maps drop it on restart.
	e := state.Endpoint{
		Name: name, Namespace: ns, Labels: labels,
		NetnsPath: req.Netns, HostIfName: hostIf, IfIndex: res.HostIfIndex,
		IPs: ips, Identity: id, ID: h.store.AllocateEndpointID(),
		HostMAC: res.HostMAC.String(), PodMAC: res.PodMAC.String(),
		Created:     time.Now().UTC().Truncate(time.Microsecond),
		ContainerID: req.ContainerID, PodIfName: podIf, PodUID: req.PodUID,
	}
	commit, err := h.store.StageEndpoint(e)
	if err != nil {
		return fail(err)
	}
	written := make(chan error, 1)
	go func() { written <- commit() }()
	h.mu.Lock()
	unreserve() // the store holds the netns now
	h.mu.Unlock()
	undo = append(undo, func() {
		// After the write: the delete waits for it.
		h.logErr("forget endpoint", h.store.DeleteEndpoint(ns, name))
		h.rec.Request() // take its entries out of the maps again
	})
	phases.mark("staged")

	// Wait for the datapath loop to take the endpoint: its identity and
	// policy are enforced when the add returns, before the pod runs. That
	// loop writes the maps only (see agent.reconcile), and adds that
	// arrive together share its runs.
	convergeErr := h.rec.Converge(ctx)
	phases.mark("datapath")
	if err := <-written; err != nil {
		return fail(fmt.Errorf("store endpoint %s/%s: %w", ns, name, err))
	}
	phases.mark("store")
	if convergeErr != nil {
		return fail(fmt.Errorf("the datapath did not take endpoint %s/%s, so it was rolled back: %w", ns, name, convergeErr))
	}
	h.mu.Lock()
	h.mesh.EndpointAddedLocked(e)
	h.mu.Unlock()
	phases.mark("mesh")
	took := time.Since(arrived)
	h.setAddDuration(e, took)
	if h.observeAdd != nil {
		h.observeAdd(took)
	}
	h.log.Info("endpoint added", "namespace", ns, "name", name, "ips", ips, "identity", id, "interface", hostIf, "id", e.ID, "containerID", e.ContainerID, "took", took, "phases", phases.String())
	ae := toAPI(e)
	ae.AddDuration = took
	return ae, nil
}

// setAddDuration keeps how long the add of e took, for ListEndpoints.
func (h *Handlers) setAddDuration(e state.Endpoint, d time.Duration) {
	h.addDurMu.Lock()
	defer h.addDurMu.Unlock()
	h.addDurations[e.Key()] = addDuration{id: e.ID, d: d}
}

// addDurationOf is how long the add of e took (0: not known, e.g. an
// endpoint restored after a restart).
func (h *Handlers) addDurationOf(e state.Endpoint) time.Duration {
	h.addDurMu.Lock()
	defer h.addDurMu.Unlock()
	if a, ok := h.addDurations[e.Key()]; ok && a.id == e.ID {
		return a.d
	}
	return 0
}

func (h *Handlers) forgetAddDuration(e state.Endpoint) {
	h.addDurMu.Lock()
	defer h.addDurMu.Unlock()
	if a, ok := h.addDurations[e.Key()]; ok && a.id == e.ID {
		delete(h.addDurations, e.Key())
	}
}

// allocateIdentity starts allocating the identity of labels and returns
// what waits for it.
func (h *Handlers) allocateIdentity(ctx context.Context, labels identity.Labels) func() (uint32, error) {
	done := make(chan struct{})
	var id uint32
	var err error
	go func() {
		defer close(done)
		id, err = h.ids.Allocate(ctx, labels)
	}()
	return func() (uint32, error) {
		<-done
		return id, err
	}
}

// reserve checks that endpoint key can be added with netns (no endpoint
// of that name, no other endpoint or pending add in that netns) and
// reserves the netns. Callers hold the API lock.
func (h *Handlers) reserve(key, netns string) error {
	if _, ok := h.store.Endpoint(splitKey(key)); ok {
		return api.Errorf(http.StatusConflict, "endpoint %s already exists", key)
	}
	if other, ok := h.store.EndpointInNetns(netns); ok {
		return api.Errorf(http.StatusConflict, "netns %s is already used by endpoint %s", netns, other)
	}
	for other, p := range h.pendingNetns {
		if p == netns {
			return api.Errorf(http.StatusConflict, "netns %s is already used by endpoint %s (being added)", netns, other)
		}
	}
	h.pendingNetns[key] = netns
	return nil
}

// allocate gives owner its addresses.
func (h *Handlers) allocate(owner string) ([]netip.Addr, func() error, error) {
	ips, durable, err := h.ipam.AllocateAsync(owner)
	if err != nil {
		if errors.Is(err, ipam.ErrExhausted) {
			return nil, nil, api.Errorf(http.StatusServiceUnavailable, "no free pod address: %w", err)
		}
		return nil, nil, fmt.Errorf("allocate addresses: %w", err)
	}
	return ips, durable, nil
}

func splitKey(key string) (namespace, name string) {
	namespace, name, _ = strings.Cut(key, "/")
	return namespace, name
}

// releaseIdentity drops the reference an endpoint took. In cluster mode
// that may need etcd, which may be unreachable: it happens in the
// background, with retries, so no caller waits for etcd (nor holds the API
// lock while it does).
func (h *Handlers) releaseIdentity(ctx context.Context, id uint32) {
	if h.mesh != nil {
		go h.releaseIdentityEventually(id)
		return
	}
	if err := h.ids.Release(ctx, id); err != nil && !errors.Is(err, identity.ErrNotFound) {
		h.logErr("release identity", err)
	}
}

// DeleteEndpoint implements api.Backend: forget the endpoint, take it out of
// the maps, then remove its plumbing and free its address and identity.
func (h *Handlers) DeleteEndpoint(ctx context.Context, namespace, name string) error {
	return h.deleteEndpoint(ctx, namespace, name, "")
}

// DeleteEndpointOf implements api.Backend: DeleteEndpoint, only when the
// endpoint was added for containerID; otherwise nothing happens.
func (h *Handlers) DeleteEndpointOf(ctx context.Context, namespace, name, containerID string) error {
	if containerID == "" {
		return api.Errorf(http.StatusBadRequest, "container ID is empty")
	}
	return h.deleteEndpoint(ctx, namespace, name, containerID)
}

func (h *Handlers) deleteEndpoint(ctx context.Context, namespace, name, containerID string) error {
	ctx = context.WithoutCancel(ctx)
	if namespace == "" {
		namespace = "default"
	}
	defer h.endpointLocks.Lock(state.EndpointKey(namespace, name))()
	h.mu.Lock()
	defer h.mu.Unlock()
	e, ok := h.store.Endpoint(namespace, name)
	if !ok {
		return api.Errorf(http.StatusNotFound, "endpoint %s/%s not found", namespace, name)
	}
	if containerID != "" && e.ContainerID != containerID {
		h.log.Info("endpoint delete skipped: the endpoint belongs to another container", "namespace", namespace, "name", name,
			"containerID", containerID, "endpointContainerID", e.ContainerID)
		return nil
	}
	if err := h.removeLocked(ctx, e); err != nil {
		return err
	}
	h.log.Info("endpoint deleted", "namespace", namespace, "name", name, "containerID", e.ContainerID)
	return nil
}

// removeLocked forgets endpoint e, takes it out of the datapath and tears
// its plumbing down. Callers hold e's endpoint lock and the API lock.
func (h *Handlers) removeLocked(ctx context.Context, e state.Endpoint) error {
	if err := h.store.DeleteEndpoint(e.Namespace, e.Name); err != nil {
		return err
	}
	h.forgetAddDuration(e)
	if err := h.rec.Converge(ctx); err != nil {
		// The endpoint is gone from the desired state; the loop keeps
		// retrying to drop its map entries.
		h.log.Warn("datapath not yet updated after endpoint delete", "namespace", e.Namespace, "name", e.Name, "err", err)
	}
	err := h.teardown(ctx, e)
	h.mesh.EndpointDeletedLocked(e.Key())
	if err != nil {
		return fmt.Errorf("endpoint %s was removed, but cleaning up after it failed (retried when the agent restarts): %w", e.Key(), err)
	}
	return nil
}

// CollectEndpoints implements api.Backend: the CNI GC. Endpoints without a
// container ID (added by the CLI) are never collected; an endpoint that
// changed since the call started (re-added for a new container) is kept.
func (h *Handlers) CollectEndpoints(ctx context.Context, req api.GCRequest) (api.GCResult, error) {
	ctx = context.WithoutCancel(ctx)
	valid := map[string]bool{}
	for _, id := range req.Valid {
		valid[id] = true
	}
	var res api.GCResult
	for _, cand := range h.store.Endpoints() {
		if cand.ContainerID == "" || valid[cand.ContainerID] {
			continue
		}
		func() {
			defer h.endpointLocks.Lock(cand.Key())()
			h.mu.Lock()
			defer h.mu.Unlock()
			e, ok := h.store.Endpoint(cand.Namespace, cand.Name)
			if !ok || e.ID != cand.ID || e.ContainerID != cand.ContainerID {
				return // deleted or replaced meanwhile
			}
			h.log.Info("CNI garbage collection: removing endpoint of a container the runtime no longer has", "namespace", e.Namespace, "name", e.Name, "containerID", e.ContainerID)
			if err := h.removeLocked(ctx, e); err != nil {
				res.Errors = append(res.Errors, err.Error())
				return
			}
			res.Removed = append(res.Removed, toAPI(e))
		}()
	}
	return res, nil
}

// teardown removes the plumbing of an endpoint that is no longer desired and
// frees its address and identity. The address is freed only once the veth
// is gone: until then the IPAM owner is how a restarted agent finds the
// leftover (see CollectGarbage).
func (h *Handlers) teardown(ctx context.Context, e state.Endpoint) error {
	if err := h.dp.ReleaseEndpoint(e.HostIfName); err != nil {
		h.log.Warn("release datapath", "interface", e.HostIfName, "err", err)
	}
	if err := h.plumb.Delete(e.HostIfName); err != nil {
		return err
	}
	var errs []error
	if err := h.ipam.Release(ownerOf(e.Namespace, e.Name)); err != nil && !errors.Is(err, ipam.ErrNotFound) {
		errs = append(errs, err)
	}
	// In cluster mode only a reference this process took is released: one
	// of an earlier run expires with that run's lease.
	if e.Identity != 0 && (h.mesh == nil || h.mesh.IsReferenced(e.Key())) {
		if h.mesh != nil {
			// The etcd allocator may be unreachable: the endpoint is gone
			// locally either way, and the reference is dropped once etcd
			// answers (or expires with this node's lease).
			go h.releaseIdentityEventually(e.Identity)
		} else if err := h.ids.Release(ctx, e.Identity); err != nil && !errors.Is(err, identity.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	return oneline.Join(errs...)
}

// releaseIdentityEventually drops an identity reference in etcd, retrying
// with backoff while the kvstore is unreachable.
func (h *Handlers) releaseIdentityEventually(id uint32) {
	wait := time.Second
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := h.ids.Release(ctx, id)
		cancel()
		if err == nil || errors.Is(err, identity.ErrNotFound) {
			return
		}
		if attempt == 0 || attempt%10 == 0 {
			h.log.Warn("identity release pending: kvstore unreachable, retrying", "identity", id, "err", err)
		}
		time.Sleep(wait)
		wait = min(2*wait, 30*time.Second)
	}
}

// ListEndpoints implements api.Backend.
func (h *Handlers) ListEndpoints(context.Context) ([]api.Endpoint, error) {
	var out []api.Endpoint
	for _, e := range h.store.Endpoints() {
		ae := toAPI(e)
		ae.BigTCP = h.bigtcp.Endpoint(e.Key())
		ae.AddDuration = h.addDurationOf(e)
		out = append(out, ae)
	}
	return out, nil
}

func toAPI(e state.Endpoint) api.Endpoint {
	return api.Endpoint{
		Name: e.Name, Namespace: e.Namespace, Labels: e.Labels, Netns: e.NetnsPath,
		Interface: e.HostIfName, IfIndex: e.IfIndex, IPs: e.IPs, Identity: e.Identity, ID: e.ID,
		HostMAC: e.HostMAC, PodMAC: e.PodMAC, Created: e.Created,
		ContainerID: e.ContainerID, IfName: e.PodIfName, PodUID: e.PodUID,
	}
}

// validateContainerID accepts what CNI allows: letters, digits, '_', '.'
// and '-', starting with a letter or digit; empty is the CLI's.
func validateContainerID(id string) error {
	if id == "" {
		return nil
	}
	if len(id) > 256 {
		return api.Errorf(http.StatusBadRequest, "container ID is %d bytes, at most 256", len(id))
	}
	for i, c := range id {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || i > 0 && (c == '_' || c == '.' || c == '-')
		if !ok {
			return api.Errorf(http.StatusBadRequest, "container ID %q: only letters, digits, '_', '.' and '-' (not first)", id)
		}
	}
	return nil
}

// validateIfName checks a pod interface name as the kernel takes it.
func validateIfName(n string) error {
	if n == "" {
		return nil
	}
	if len(n) > 15 || n == "." || n == ".." || strings.ContainsAny(n, "/: \t\n\x00") {
		return api.Errorf(http.StatusBadRequest, "pod interface name %q: 1 to 15 bytes, no '/', ':' or whitespace, not . or ..", n)
	}
	return nil
}

func ifNameOrDefault(n string) string {
	if n == "" {
		return endpoint.DefaultPodIfName
	}
	return n
}

// RestoreEndpoints runs at start: every persisted endpoint gets its datapath
// programs re-attached (updated in place, no gap). A veth that vanished while
// its pod's netns still exists is created again with the same addresses; an
// endpoint whose netns is gone is removed, since its pod is gone.
func (h *Handlers) RestoreEndpoints(ctx context.Context) {
	for _, e := range h.store.Endpoints() {
		log := h.log.With("namespace", e.Namespace, "name", e.Name, "interface", e.HostIfName)
		res, err := h.plumb.Lookup(e.HostIfName)
		switch {
		case err == nil:
		case errors.Is(err, endpoint.ErrNotFound):
			if nerr := h.plumb.CheckNetns(e.NetnsPath); nerr != nil {
				log.Warn("endpoint's pod is gone; removing the endpoint", "reason", nerr)
				if err := h.store.DeleteEndpoint(e.Namespace, e.Name); err != nil {
					log.Error("forget endpoint", "err", err)
					continue
				}
				h.logErr("clean up endpoint "+e.Key(), h.teardown(ctx, e))
				continue
			}
			res, err = h.plumb.Create(endpoint.Spec{NetnsPath: e.NetnsPath, HostIfName: e.HostIfName, PodIfName: e.PodIfName, Addrs: e.IPs, MTU: h.mtu})
			if err != nil {
				log.Error("endpoint's veth is missing and cannot be recreated; fix the cause and restart the agent, or delete the endpoint", "err", err)
				continue
			}
			log.Warn("endpoint's veth was missing; recreated it")
		default:
			log.Error("look up endpoint's veth", "err", err)
			continue
		}
		if res.HostIfIndex != e.IfIndex || res.HostMAC.String() != e.HostMAC || res.PodMAC.String() != e.PodMAC {
			e.IfIndex, e.HostMAC, e.PodMAC = res.HostIfIndex, res.HostMAC.String(), res.PodMAC.String()
			if err := h.store.PutEndpoint(e); err != nil {
				log.Error("update endpoint", "err", err)
			}
		}
		if err := h.dp.AttachEndpoint(e.HostIfName, res.HostIfIndex); err != nil {
			log.Error("re-attach datapath", "err", err)
		}
	}
}

// CollectGarbage removes what a crash between two steps of an add or delete
// left behind: addresses (and the veth named after their owner) of endpoints
// that are not in the desired state, and identities no endpoint uses.
func (h *Handlers) CollectGarbage(ctx context.Context) {
	eps := h.store.Endpoints()
	known := map[string]bool{}
	refs := map[uint32]int{}
	for _, e := range eps {
		known[ownerOf(e.Namespace, e.Name)] = true
		refs[e.Identity]++
	}
	for owner := range h.ipam.Allocations() {
		if known[owner] {
			continue
		}
		ns, name, _ := strings.Cut(owner, "/")
		hostIf := endpoint.HostIfName(h.node, ns, name)
		h.log.Warn("removing leftovers of an endpoint that does not exist", "owner", owner, "interface", hostIf)
		h.logErr("release datapath", h.dp.ReleaseEndpoint(hostIf))
		if err := h.plumb.Delete(hostIf); err != nil {
			h.logErr("delete leftover veth", err)
			continue
		}
		h.logErr("release leftover addresses", h.ipam.Release(owner))
	}
	// A veth whose add stopped before its addresses were written: the
	// loop above does not know its owner.
	ifs := map[string]bool{}
	for _, e := range eps {
		ifs[e.HostIfName] = true
	}
	names, err := h.plumb.List()
	h.logErr("list veths", err)
	for _, n := range names {
		if ifs[n] {
			continue
		}
		h.log.Warn("removing a pod veth no endpoint has", "interface", n)
		h.logErr("release datapath", h.dp.ReleaseEndpoint(n))
		h.logErr("delete leftover veth", h.plumb.Delete(n))
	}
	// Valid for the node-local allocator only, where every reference is this
	// node's: an etcd-backed one lists the whole cluster's identities. Its
	// counts in memory are the endpoints' (it writes only changes of the
	// set of identities): it frees those no endpoint uses.
	local, ok := h.ids.(interface {
		SetRefs(map[uint32]uint64) ([]uint32, error)
	})
	if h.mesh != nil || !ok {
		return
	}
	counts := map[uint32]uint64{}
	for id, n := range refs {
		counts[id] = uint64(n)
	}
	freed, err := local.SetRefs(counts)
	if err != nil {
		h.logErr("set identity references from the endpoints", err)
		return
	}
	for _, id := range freed {
		h.log.Warn("released identity no endpoint uses", "identity", id)
	}
}

// ownerOf is the IPAM owner of an endpoint.
func ownerOf(namespace, name string) string { return state.EndpointKey(namespace, name) }

// phaseTimer records how long each step of an endpoint add took, for the
// log: where a slow add spent its time.
type phaseTimer struct {
	last  time.Time
	steps []string
}

func (p *phaseTimer) mark(step string) {
	now := time.Now()
	p.steps = append(p.steps, fmt.Sprintf("%s=%s", step, now.Sub(p.last).Round(100*time.Microsecond)))
	p.last = now
}

func (p *phaseTimer) String() string { return strings.Join(p.steps, " ") }
