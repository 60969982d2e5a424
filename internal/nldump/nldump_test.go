package nldump

import (
	"errors"
	"testing"

	"github.com/vishvananda/netlink"
)

func TestRetry(t *testing.T) {
	calls := 0
	v, err := Retry(func() (int, error) {
		calls++
		if calls < 3 {
			return -1, netlink.ErrDumpInterrupted
		}
		return 42, nil
	})
	if v != 42 || err != nil || calls != 3 {
		t.Fatalf("Retry = %d, %v after %d calls; want 42, nil after 3", v, err, calls)
	}

	calls = 0
	_, err = Retry(func() (int, error) { calls++; return -1, netlink.ErrDumpInterrupted })
	if !errors.Is(err, netlink.ErrDumpInterrupted) || calls != Tries {
		t.Fatalf("always interrupted: %v after %d calls; want ErrDumpInterrupted after %d", err, calls, Tries)
	}

	boom := errors.New("boom")
	calls = 0
	if _, err := Retry(func() (int, error) { calls++; return 0, boom }); err != boom || calls != 1 {
		t.Fatalf("another error: %v after %d calls; want it at once", err, calls)
	}
}
