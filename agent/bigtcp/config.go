// Package bigtcp is the reconciler of BIG TCP: the GSO and GRO maximum
// sizes (IPv6: gso_max_size/gro_max_size; IPv4: gso_ipv4_max_size/
// gro_ipv4_max_size) on the node's external devices (the underlay, the
// default route's, the WireGuard device) and on both ends of every pod
// veth, set through netlink and probed against each device's
// tso_max_size. Pods get the sizes when their endpoint is added and are
// reconciled in place afterwards (no restart, no link flap); turning a
// family off writes 65536 back.
//
// A device that refuses a size (a write fails, or reads back different)
// is rolled back to 65536 alone and reported with the reason; other
// devices keep theirs. The status names four paths a pod's traffic takes
// (same node, other nodes in the clear, other nodes through WireGuard, the
// outside) and says per family whether each carries packets beyond 64 KiB
// and why not.
//
// IPv6 and forwarding: Linux (up to at least 6.18) puts an 8-byte jumbo
// hop-by-hop header in front of every IPv6 GSO packet beyond 64 KiB, and
// ip6_forward counts it when it checks a packet's segments against the next
// hop's MTU. A pod whose MTU equals the next hop's would get a Packet Too
// Big for each such packet the node forwards. While IPv6 BIG TCP is on for
// a pod, its IPv6 default route therefore carries an MTU 8 bytes below the
// device's, so its segments fit with the header on every hop.
package bigtcp

import (
	"errors"
	"fmt"
)

// Sizes in bytes.
const (
	// LegacySize is the GSO/GRO size without BIG TCP (GSO_LEGACY_MAX_SIZE).
	LegacySize = 65536
	// DefaultSize is --big-tcp-size's default (Cilium's too).
	DefaultSize = 196608
	// MaxSize is the largest size accepted (512 KiB; the kernel's own limit,
	// 8 * 65535, and each device's tso_max_size cap what is written).
	MaxSize = 524288
	// JumboHeader is the IPv6 hop-by-hop header the kernel adds to BIG TCP
	// packets, and so what the pod's IPv6 route MTU leaves free.
	JumboHeader = 8
)

// Mode is the setting of one family.
type Mode string

// Modes.
const (
	Off Mode = "off"
	On  Mode = "on"
	// Auto is on where the kernel and the device support it; a device
	// that cannot is left at 65536 and reported, not failed.
	Auto Mode = "auto"
)

// ParseMode parses a mode; flag names the setting in the error.
func ParseMode(flag, s string) (Mode, error) {
	switch m := Mode(s); m {
	case Off, On, Auto:
		return m, nil
	}
	return "", fmt.Errorf("%s %q: want off, on or auto", flag, s)
}

// Config is the agent's BIG TCP setting.
type Config struct {
	IPv6, IPv4 Mode
	Size       int // GSO/GRO size to set; DefaultSize when 0
}

// Enabled reports whether the family (v6 or not) is wanted at all.
func (c Config) Enabled(v6 bool) bool {
	if v6 {
		return c.IPv6 == On || c.IPv6 == Auto
	}
	return c.IPv4 == On || c.IPv4 == Auto
}

// WithDefaults fills the zero fields.
func (c Config) WithDefaults() Config {
	if c.IPv6 == "" {
		c.IPv6 = Auto
	}
	if c.IPv4 == "" {
		c.IPv4 = Auto
	}
	if c.Size == 0 {
		c.Size = DefaultSize
	}
	return c
}

// Validate checks the setting (after WithDefaults).
func (c Config) Validate() error {
	var errs []error
	for _, f := range []struct {
		flag string
		m    Mode
	}{{"--ipv6-big-tcp", c.IPv6}, {"--ipv4-big-tcp", c.IPv4}} {
		if _, err := ParseMode(f.flag, string(f.m)); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Size <= LegacySize || c.Size > MaxSize {
		errs = append(errs, fmt.Errorf("--big-tcp-size %d out of range %d-%d (bytes; 65536 is the size without BIG TCP)", c.Size, LegacySize+1, MaxSize))
	}
	return errors.Join(errs...)
}
