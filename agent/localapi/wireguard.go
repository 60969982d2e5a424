package localapi

import (
	"context"
	"net/http"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// RotateWireGuardKey implements api.Backend: a new key, applied to the
// device, written to the key file and published. Peers switch to it when
// the node record reaches them; flows pause for about one handshake.
func (h *Handlers) RotateWireGuardKey(ctx context.Context) (api.WireGuardStatus, error) {
	if h.enc == nil {
		return api.WireGuardStatus{}, api.Errorf(http.StatusConflict, "encryption is off on this node (start the agent with --encryption=wireguard)")
	}
	h.mu.Lock()
	err := h.enc.Rotate()
	if err == nil {
		h.mesh.PublishLocked()
	}
	h.mu.Unlock()
	if err != nil {
		return api.WireGuardStatus{}, err
	}
	h.rec.Request()
	return *h.enc.Status(), nil
}
