package wireguard

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// inNetns runs fn on a fresh OS thread switched into ns. The thread is never
// unlocked, so the runtime throws it away when the goroutine ends instead of
// handing a thread in a foreign namespace to other goroutines. Sockets and
// TUN devices created inside fn belong to ns for good, whichever thread uses
// them later.
func inNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
