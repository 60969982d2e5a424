package bpf

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Conntrack lifetimes after the last packet. The table is an LRU, so these
// only bound how long an idle flow keeps its backend and its policy verdict.
const (
	ctTimeoutTCP     = 6 * time.Hour
	ctTimeoutClosing = 10 * time.Second
	ctTimeoutOther   = 60 * time.Second
	ctFlagClosing    = 0x4
)

// monotonicNow is the clock bpf_ktime_get_ns reads.
func monotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// ConntrackGC deletes flows idle for longer than their lifetime and returns
// how many it removed.
func (d *Datapath) ConntrackGC() (int, error) {
	now := monotonicNow()
	var expired []datapathCtKey
	var k datapathCtKey
	var v datapathCtVal
	it := d.objs.IsthCt.Iterate()
	for it.Next(&k, &v) {
		timeout := ctTimeoutOther
		if Proto(k.Proto) == ProtoTCP {
			timeout = ctTimeoutTCP
			if v.Flags&ctFlagClosing != 0 {
				timeout = ctTimeoutClosing
			}
		}
		if now > v.LastSeen && time.Duration(now-v.LastSeen) > timeout {
			expired = append(expired, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("conntrack gc: %w", err)
	}
	n := 0
	for i := range expired {
		if err := d.objs.IsthCt.Delete(&expired[i]); err == nil {
			n++
		}
	}
	return n, nil
}
