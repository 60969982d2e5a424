package agent

import (
	"fmt"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/agent/encryption"
	"github.com/isthmus-mesh/isthmus/agent/node"
)

const (
	// EncryptionNone and EncryptionWireGuard are the values of --encryption.
	EncryptionNone      = encryption.ModeNone
	EncryptionWireGuard = encryption.ModeWireGuard
	// EncryptionTable is the routing table of the tunnel routes.
	EncryptionTable = encryption.Table
)

// DefaultWireGuardDevice names the device when --wireguard-device is not
// given: "isthwg" plus a short hash of the cluster and node name, so
// several agents on one host (a lab) get different devices.
func DefaultWireGuardDevice(cluster, node string) string {
	return encryption.DefaultDevice(cluster, node)
}

func (c Config) encrypted() bool { return c.Encryption == EncryptionWireGuard }

// setUpEncryption opens the WireGuard device when encryption is on, and
// removes the routing an encrypted earlier run left when it is off. It also
// settles an automatic pod MTU.
func (a *Agent) setUpEncryption() error {
	if !a.cfg.encrypted() {
		if a.cfg.MTU == 0 {
			a.cfg.MTU, _ = node.UnderlayMTU(a.underlayIPs())
		}
		if a.mesh == nil {
			return nil // standalone agents never route through a tunnel
		}
		if err := encryption.RemoveRouting(); err != nil {
			a.log.Warn("cannot remove the encryption routing of an earlier run", "err", err)
		}
		return nil
	}
	// The mesh detects the node IPs later the same way; the MTU needs them
	// now (an IPv6-only underlay costs 20 bytes more).
	underlay, v6 := node.UnderlayMTU(a.underlayIPs())
	enc, err := encryption.Open(encryption.Config{
		Cluster: a.cfg.ClusterName, Node: a.cfg.NodeName, Device: a.cfg.WireGuardDevice, Port: a.cfg.WireGuardPort,
		NodeEncryption: a.cfg.NodeEncryption, StateDir: a.cfg.StateDir, UnderlayMTU: underlay, UnderlayV6: v6, Log: a.log,
	})
	if err != nil {
		return fmt.Errorf("encryption: %w", err)
	}
	a.enc = enc
	if a.cfg.MTU == 0 {
		a.cfg.MTU = enc.MTU()
	} else if a.cfg.MTU > enc.MTU() {
		a.log.Warn("pod MTU is larger than the WireGuard device's: big packets to other nodes need path MTU discovery", "mtu", a.cfg.MTU, "wireguardMTU", enc.MTU())
	}
	return nil
}

// underlayIPs are the node's underlay addresses: --node-ip, or else those
// the mesh would detect (the default route's interface's).
func (a *Agent) underlayIPs() []netip.Addr {
	if len(a.cfg.NodeIPs) > 0 {
		return a.cfg.NodeIPs
	}
	ips, _ := a.detectNodeIPs()
	return ips
}
