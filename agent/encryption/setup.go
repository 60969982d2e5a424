package encryption

import "fmt"

// Setup opens the device when encryption is on, and in cluster mode with
// encryption off removes the routing an encrypted earlier run left. It
// returns the device (nil when off) and the pod MTU: podMTU, or when that
// is 0 the underlay's, minus the tunnel's overhead when encrypting.
func Setup(cfg Config, on, clusterMode bool, podMTU int) (*WireGuard, int, error) {
	if !on {
		if podMTU == 0 {
			podMTU, _ = cfg.Underlay()
		}
		if !clusterMode {
			return nil, podMTU, nil // standalone agents never route through a tunnel
		}
		if err := RemoveRouting(); err != nil {
			cfg.Log.Warn("cannot remove the encryption routing of an earlier run", "err", err)
		}
		return nil, podMTU, nil
	}
	e, err := Open(cfg)
	if err != nil {
		return nil, 0, fmt.Errorf("encryption: %w", err)
	}
	if podMTU == 0 {
		podMTU = e.MTU()
	} else if podMTU > e.MTU() {
		cfg.Log.Warn("pod MTU is larger than the WireGuard device's: big packets to other nodes need path MTU discovery", "mtu", podMTU, "wireguardMTU", e.MTU())
	}
	return e, podMTU, nil
}
