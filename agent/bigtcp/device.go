package bigtcp

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// sizes are one device's BIG TCP attributes as the kernel reports them.
type sizes struct {
	gso, gro, gso4, gro4 uint32
	tsoMax               uint32
}

func sizesOf(l netlink.Link) sizes {
	a := l.Attrs()
	return sizes{gso: a.GSOMaxSize, gro: a.GROMaxSize, gso4: a.GSOIPv4MaxSize, gro4: a.GROIPv4MaxSize, tsoMax: a.TSOMaxSize}
}

// v4Supported: the kernel reports IFLA_GSO_IPV4_MAX_SIZE (Linux >= 6.3),
// so it also takes it.
func (s sizes) v4Supported() bool { return s.gso4 != 0 }

// want is what one device should hold: a size per family, and for a family
// that is on but left at 65536, why.
type want struct {
	v6, v4     uint32
	why6, why4 string
}

// plan is what a device with s should hold under c: the configured size,
// capped by its tso_max_size; 65536 where that leaves nothing above it.
func plan(c Config, s sizes) want { return planFor(c, s.tsoMax, s.v4Supported()) }

// planFor is plan for a device that takes GSO packets up to tsoMax (0: any
// size the kernel does) on a kernel that has the IPv4 attributes or not.
func planFor(c Config, tsoMax uint32, v4Supported bool) want {
	w := want{v6: LegacySize, v4: LegacySize}
	size := uint32(c.Size)
	if tsoMax > 0 && tsoMax < size {
		size = tsoMax
	}
	tooSmall := fmt.Sprintf("tso_max_size %d: the device takes no GSO packet beyond 64 KiB", tsoMax)
	if c.Enabled(true) {
		if size > LegacySize {
			w.v6 = size
		} else {
			w.why6 = tooSmall
		}
	}
	if c.Enabled(false) {
		switch {
		case !v4Supported:
			w.why4 = "the kernel has no IPv4 BIG TCP (gso_ipv4_max_size, Linux >= 6.3)"
		case size > LegacySize:
			w.v4 = size
		default:
			w.why4 = tooSmall
		}
	}
	return w
}

func (s sizes) holds(w want) bool {
	ok := s.gso == w.v6 && s.gro == w.v6
	if s.v4Supported() {
		ok = ok && s.gso4 == w.v4 && s.gro4 == w.v4
	}
	return ok
}

// converge writes w to the device and reads it back. The IPv6 attributes
// go first: the kernel resets the IPv4 size when gso_max_size or
// gro_max_size is written at or below 65536. A write that fails, or a
// size the kernel does not keep, rolls the device back to 65536 (all four
// attributes) and returns why; the sizes returned are what it holds then.
func converge(h *netlink.Handle, l netlink.Link, w want) (sizes, error) {
	cur := sizesOf(l)
	if cur.holds(w) {
		return cur, nil
	}
	err := write(h, l, cur.v4Supported(), w.v6, w.v4)
	if err == nil {
		if got, rerr := reread(h, l); rerr != nil {
			err = rerr
		} else if !got.holds(w) {
			err = fmt.Errorf("the kernel kept gso/gro %d/%d, ipv4 %d/%d after writing %d (ipv4 %d)", got.gso, got.gro, got.gso4, got.gro4, w.v6, w.v4)
		} else {
			return got, nil
		}
	}
	err = fmt.Errorf("set BIG TCP sizes on %s: %w", l.Attrs().Name, err)
	if rb := write(h, l, cur.v4Supported(), LegacySize, LegacySize); rb != nil {
		err = errors.Join(err, fmt.Errorf("roll %s back to %d: %w", l.Attrs().Name, LegacySize, rb))
	}
	got, rerr := reread(h, l)
	if rerr != nil {
		return cur, errors.Join(err, rerr)
	}
	return got, err
}

// write sets the four attributes, IPv6 first.
func write(h *netlink.Handle, l netlink.Link, v4 bool, v6size, v4size uint32) error {
	steps := []struct {
		attr string
		set  func(netlink.Link, int) error
		size uint32
	}{
		{"gso_max_size", h.LinkSetGSOMaxSize, v6size},
		{"gro_max_size", h.LinkSetGROMaxSize, v6size},
	}
	if v4 {
		steps = append(steps, []struct {
			attr string
			set  func(netlink.Link, int) error
			size uint32
		}{
			{"gso_ipv4_max_size", h.LinkSetGSOIPv4MaxSize, v4size},
			{"gro_ipv4_max_size", h.LinkSetGROIPv4MaxSize, v4size},
		}...)
	}
	for _, s := range steps {
		if err := s.set(l, int(s.size)); err != nil {
			return fmt.Errorf("%s %d: %w", s.attr, s.size, err)
		}
	}
	return nil
}

func reread(h *netlink.Handle, l netlink.Link) (sizes, error) {
	nl, err := h.LinkByIndex(l.Attrs().Index)
	if err != nil {
		return sizes{}, fmt.Errorf("read %s back: %w", l.Attrs().Name, err)
	}
	return sizesOf(nl), nil
}
