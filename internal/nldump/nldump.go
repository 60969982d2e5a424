// Package nldump retries netlink dumps the kernel interrupted.
//
// The kernel marks a dump interrupted (NLM_F_DUMP_INTR) when the table it
// walks changed during the walk: a link, address or route added or removed
// meanwhile, as happens all the time on a node where pods come and go.
// vishvananda/netlink then returns what it got with ErrDumpInterrupted;
// the answer may miss entries or hold stale ones, so it is asked again.
package nldump

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// Tries is how many times Retry asks before it gives up.
const Tries = 8

// Retry calls dump until it returns without ErrDumpInterrupted, at most
// Tries times; the last interrupted answer is an error.
func Retry[T any](dump func() (T, error)) (T, error) {
	var v T
	var err error
	for range Tries {
		v, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	var zero T
	return zero, fmt.Errorf("interrupted %d times in a row by changes to the table: %w", Tries, err)
}
