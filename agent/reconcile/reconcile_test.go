package reconcile

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
)

// Requests coalesce into runs, and Converge returns with the result of a
// run that covered the caller's change.
func TestConverge(t *testing.T) {
	r := New()
	var runs atomic.Int32
	fail := atomic.Bool{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		r.Loop(ctx, slog.Default(), func(context.Context) error {
			runs.Add(1)
			if fail.Load() {
				return errors.New("map full")
			}
			return nil
		})
		close(done)
	}()
	defer func() { cancel(); <-done }()

	if err := r.Converge(ctx); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	if err := r.Converge(ctx); err == nil || err.Error() != "map full" {
		t.Errorf("Converge over a failing run = %v", err)
	}
	fail.Store(false)
	if err := r.Converge(ctx); err != nil {
		t.Fatal(err)
	}
	st := r.Stats()
	if st.Runs < 3 || st.Errors < 1 || st.LastSuccess.IsZero() {
		t.Errorf("stats %+v after %d runs", st, runs.Load())
	}
}
