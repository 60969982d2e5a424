package agent

import "github.com/isthmus-mesh/isthmus/agent/api"

// wireguardStatus is the "wireguard" section of the status; nil when
// encryption is off.
func (a *Agent) wireguardStatus() *api.WireGuardStatus { return nil }
