package resilientpg

import (
	"context"
	"database/sql/driver"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// The time counters: connect time and checkout ping time, measured
// exactly in synctest bubbles.

// timedConnector takes a given time per Connect and fails the ones given
// an error, so connect time is known exactly in a synctest bubble.
type timedConnector struct {
	*fakeConnector
	mu    sync.Mutex
	steps []timedStep
}

type timedStep struct {
	took time.Duration
	err  error
}

func (tc *timedConnector) Connect(ctx context.Context) (driver.Conn, error) {
	tc.mu.Lock()
	st := tc.steps[0]
	tc.steps = tc.steps[1:]
	tc.mu.Unlock()
	time.Sleep(st.took)
	if st.err != nil {
		return nil, st.err
	}
	return tc.fakeConnector.Connect(ctx)
}

// TestConnectTime: every dial's time is added to ConnectTime, failed ones
// and probes included; nothing else is.
func TestConnectTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tc := &timedConnector{fakeConnector: &fakeConnector{shape: shapePgx}, steps: []timedStep{
			{took: 250 * time.Millisecond}, {took: 150 * time.Millisecond},
			{took: 100 * time.Millisecond, err: errRefused}, // closes the gate: fails fast
			{took: 50 * time.Millisecond},                   // the probe
		}}
		c, err := NewConnector(tc, opts(func(o *Options) { o.ConnectWait = 0 }))
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		for i := range 2 {
			if _, err := c.Connect(ctx); err != nil {
				t.Fatalf("connect %d: %v", i, err)
			}
		}
		if s := c.Stats(); s.ConnectTime != 400*time.Millisecond || s.ConnectAttempts != 2 {
			t.Errorf("after two connects of 250 and 150 ms: ConnectTime %v, attempts %d; want 400ms, 2", s.ConnectTime, s.ConnectAttempts)
		}
		if _, err := c.Connect(ctx); err == nil {
			t.Fatal("a refused connect succeeded")
		}
		time.Sleep(time.Second) // the gate's probe is due
		if _, err := c.Connect(ctx); err != nil {
			t.Fatalf("probe: %v", err)
		}
		s := c.Stats()
		if s.ConnectTime != 550*time.Millisecond || s.ConnectAttempts != 4 || s.Gate.Probes != 1 ||
			s.ConnectFailures[ClassCannotConnect] != 1 || s.ConnectFailures.Total() != 1 {
			t.Errorf("ConnectTime %v, attempts %d, probes %d, failures %v; want 550ms (the failed dial's 100ms included), 4, 1, one cannot_connect",
				s.ConnectTime, s.ConnectAttempts, s.Gate.Probes, s.ConnectFailures)
		}
	})
}

// TestPingTime: checkout pings are counted with their total and slowest
// time; a ping that fails at resilient_ping_timeout adds that time, and
// counts as a failure.
func TestPingTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(func(o *Options) {
			o.Ping, o.PingTimeout = PingAlways, 500*time.Millisecond
		}))
		w, fc := connect(c, f)
		takes := []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, 200 * time.Millisecond, time.Hour}
		fc.pingErr = func(ctx context.Context) error {
			d := takes[0]
			takes = takes[1:]
			select {
			case <-time.After(d):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		ctx := context.Background()
		for i := range 3 {
			w.IsValid()
			if err := w.ResetSession(ctx); err != nil {
				t.Fatalf("checkout %d: %v", i, err)
			}
		}
		s := c.Stats()
		if s.Pings != 3 || s.PingFailures != 0 || s.PingTime != 600*time.Millisecond || s.PingTimeMax != 300*time.Millisecond {
			t.Errorf("pings %d (%d failed), total %v, max %v; want 3 (0), 600ms, 300ms", s.Pings, s.PingFailures, s.PingTime, s.PingTimeMax)
		}
		w.IsValid()
		if err := w.ResetSession(ctx); err == nil {
			t.Fatal("a ping past resilient_ping_timeout passed")
		}
		s = c.Stats()
		if s.Pings != 4 || s.PingFailures != 1 || s.PingTime != 1100*time.Millisecond || s.PingTimeMax != 500*time.Millisecond ||
			s.Discards[DiscardPingFailed] != 1 {
			t.Errorf("after a timed-out ping: pings %d (%d failed), total %v, max %v, discards %v; want 4 (1), 1.1s, 500ms, one ping_failed",
				s.Pings, s.PingFailures, s.PingTime, s.PingTimeMax, s.Discards)
		}
	})
}
