package faultlab

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// defaultOpTimeout bounds admin operations whose caller passed a context
// without a deadline, so a wedged server cannot hang a test forever.
const defaultOpTimeout = 30 * time.Second

// withDeadline returns ctx unchanged if it already has a deadline, and
// otherwise one that expires after d.
func withDeadline(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// errGiveUp, returned by a poll callback, stops polling at once: it marks
// failures that waiting cannot fix (for example, the server process exited).
var errGiveUp = errors.New("faultlab: giving up")

// poll calls try until it returns nil, at most attempts times, pausing
// interval between calls, and never past limit or ctx's end. Every wait in
// this package goes through here so that none of them can spin forever.
// The last error from try is part of the returned error.
func poll(ctx context.Context, attempts int, interval, limit time.Duration, what string, try func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var last error
	for i := 0; i < attempts; i++ {
		last = try(ctx)
		if last == nil {
			return nil
		}
		if errors.Is(last, errGiveUp) {
			return fmt.Errorf("faultlab: %s: %w", what, last)
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("faultlab: %s: %w (last error: %v)", what, ctx.Err(), last)
		case <-t.C:
		}
	}
	return fmt.Errorf("faultlab: %s: gave up after %d attempts: %w", what, attempts, last)
}
