package bgp

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Config is what the speaker should be: its identity, its peers and the
// paths it announces. The zero Config is a stopped speaker.
type Config struct {
	ASN      uint32
	RouterID netip.Addr // IPv4
	// ListenPort is the port the speaker accepts sessions on; 0 (the
	// default) listens nowhere: the speaker only dials out.
	ListenPort uint16
	Peers      []Peer
	Paths      []Path
}

// Enabled reports whether the config runs a speaker.
func (c Config) Enabled() bool { return c.ASN != 0 }

// Peer is one neighbour.
type Peer struct {
	Address netip.Addr
	ASN     uint32
	Port    uint16 // 0: 179
	// MultihopTTL is the TTL of an eBGP session's packets (0 or 1:
	// directly connected).
	MultihopTTL uint8
	// Password is the TCP MD5 password (RFC 2385); "" for none.
	Password string
	// PasswordError, when set, keeps the peer down and is its status's
	// last error (the password file could not be read): a session without
	// the password would be refused by the peer anyway.
	PasswordError string
	HoldTime      time.Duration // 0: no keepalives
	Keepalive     time.Duration
	ConnectRetry  time.Duration
	// GracefulRestart on: the peer keeps our routes for RestartTime while
	// we restart.
	GracefulRestart bool
	RestartTime     time.Duration
}

// Path is one announced prefix with its attributes.
type Path struct {
	Prefix      netip.Prefix
	Communities []uint32    // standard communities, sorted
	Large       [][3]uint32 // large communities, sorted
	LocalPref   uint32      // 0: none (sent to iBGP peers only)
}

// Equal reports whether p and q are the same path.
func (p Path) Equal(q Path) bool {
	return p.Prefix == q.Prefix && p.LocalPref == q.LocalPref && slices.Equal(p.Communities, q.Communities) && slices.Equal(p.Large, q.Large)
}

// Validate checks what GoBGP would refuse or misuse.
func (c Config) Validate() error {
	if !c.Enabled() {
		if len(c.Peers) > 0 || len(c.Paths) > 0 {
			return errors.New("bgp: peers or paths without a local ASN")
		}
		return nil
	}
	if !c.RouterID.Is4() || c.RouterID.IsUnspecified() {
		return fmt.Errorf("bgp: router ID %v is not an IPv4 address", c.RouterID)
	}
	seen := map[netip.Addr]bool{}
	for _, p := range c.Peers {
		if !p.Address.IsValid() || p.ASN == 0 {
			return fmt.Errorf("bgp: peer %v: address and ASN are required", p.Address)
		}
		if seen[p.Address] {
			return fmt.Errorf("bgp: peer %s listed twice", p.Address)
		}
		seen[p.Address] = true
		if p.HoldTime != 0 && (p.Keepalive <= 0 || p.Keepalive >= p.HoldTime) {
			return fmt.Errorf("bgp: peer %s: keepalive %v must be below the hold time %v", p.Address, p.Keepalive, p.HoldTime)
		}
	}
	prefixes := map[netip.Prefix]bool{}
	for _, p := range c.Paths {
		if !p.Prefix.IsValid() || p.Prefix.Masked() != p.Prefix {
			return fmt.Errorf("bgp: path %v is not a prefix", p.Prefix)
		}
		if prefixes[p.Prefix] {
			return fmt.Errorf("bgp: path %s listed twice", p.Prefix)
		}
		prefixes[p.Prefix] = true
	}
	return nil
}
