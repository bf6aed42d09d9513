package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

func testOrphan() orphan {
	born := time.Date(2026, 12, 5, 2, 0, 0, 0, time.UTC)
	return orphan{id: 4242, local: netip.MustParseAddrPort("198.18.0.1:51234"),
		start: born.Add(-8 * time.Millisecond), born: born}
}

// TestOrphanMatchesPg: a session is ours only if the server saw our
// address and port and the backend started while we connected; anything
// else, or anything missing, is not ours.
func TestOrphanMatchesPg(t *testing.T) {
	o := testOrphan()
	slack := 5 * time.Millisecond
	mid := o.start.Add(4 * time.Millisecond)
	cases := []struct {
		name string
		row  pgActivity
		want bool
	}{
		{"same address, port, start inside the connect", pgActivity{"198.18.0.1", 51234, mid}, true},
		{"start at the connect's first instant", pgActivity{"198.18.0.1", 51234, o.start}, true},
		{"start within slack after the connect", pgActivity{"198.18.0.1", 51234, o.born.Add(slack)}, true},
		{"IPv4-mapped address", pgActivity{"::ffff:198.18.0.1", 51234, mid}, true},
		{"another port (PgBouncer's own)", pgActivity{"198.18.0.1", 51235, mid}, false},
		{"another address (a proxy, NAT)", pgActivity{"198.18.0.5", 51234, mid}, false},
		{"started before the connect: a reused pid", pgActivity{"198.18.0.1", 51234, o.start.Add(-slack - time.Millisecond)}, false},
		{"started after the connect ended", pgActivity{"198.18.0.1", 51234, o.born.Add(slack + time.Millisecond)}, false},
		{"another role's session: no address shown", pgActivity{"", -1, mid}, false},
		{"a Unix socket session: no address", pgActivity{"", -1, time.Time{}}, false},
		{"no start", pgActivity{"198.18.0.1", 51234, time.Time{}}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := o.matchesPg(tc.row, slack); got != tc.want {
				t.Errorf("matchesPg(%+v) = %v, want %v", tc.row, got, tc.want)
			}
		})
	}
}

func TestOrphanMatchesMySQLHost(t *testing.T) {
	o := testOrphan()
	lo := orphan{id: 7, local: netip.MustParseAddrPort("127.0.0.1:40000")}
	v6 := orphan{id: 7, local: netip.MustParseAddrPort("[::1]:40000")}
	resolve := func(_ context.Context, _, name string) ([]netip.Addr, error) {
		if name == "app-1.internal" {
			return []netip.Addr{netip.MustParseAddr("10.0.0.9"), netip.MustParseAddr("198.18.0.1")}, nil
		}
		return nil, errors.New("no such host")
	}
	cases := []struct {
		name string
		o    orphan
		host string
		want bool
	}{
		{"address and port", o, "198.18.0.1:51234", true},
		{"another port", o, "198.18.0.1:51235", false},
		{"another address", o, "198.18.0.2:51234", false},
		{"loopback shown as localhost", lo, "localhost:40000", true},
		{"localhost is not a remote client", o, "localhost:51234", false},
		{"IPv6 loopback", v6, "::1:40000", true},
		{"IPv6 in brackets", v6, "[::1]:40000", true},
		{"a name that resolves to our address", o, "app-1.internal:51234", true},
		{"a name that does not", o, "app-2.internal:51234", false},
		{"a Unix socket: no port", lo, "localhost", false},
		{"garbage port", o, "198.18.0.1:x", false},
		{"empty", o, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.o.matchesMySQLHost(context.Background(), tc.host, resolve); got != tc.want {
				t.Errorf("matchesMySQLHost(%q) = %v, want %v", tc.host, got, tc.want)
			}
		})
	}
}

// TestPacerBound: however the reservations come, no window of length W
// holds more than burst + W/interval of them.
func TestPacerBound(t *testing.T) {
	const interval, burst = 200 * time.Millisecond, 5
	p := pacer{interval: interval, burst: burst}
	t0 := time.Unix(0, 0)
	var at []time.Time
	// 40 at once, then a pause long enough to refill, then 10 at once,
	// then one every 50 ms.
	arrivals := make([]time.Time, 0, 70)
	for range 40 {
		arrivals = append(arrivals, t0)
	}
	for range 10 {
		arrivals = append(arrivals, t0.Add(time.Minute))
	}
	for i := range 20 {
		arrivals = append(arrivals, t0.Add(2*time.Minute+time.Duration(i)*50*time.Millisecond))
	}
	last := t0
	for _, a := range arrivals {
		now := max64(a, last) // a single goroutine: the next comes after the last went
		slot := now.Add(p.delay(now))
		at = append(at, slot)
		last = slot
	}
	for i := range at {
		for j := i; j < len(at); j++ {
			w := at[j].Sub(at[i])
			if n, bound := j-i+1, burst+int(w/interval); n > bound {
				t.Fatalf("%d reservations within %v (from #%d), want at most %d", n, w, i, bound)
			}
		}
	}
	if !at[burst-1].Equal(t0) || !at[burst].Equal(t0.Add(interval)) {
		t.Errorf("the burst: #%d at %v, #%d at %v; want the first %d at once, then one per %v",
			burst-1, at[burst-1].Sub(t0), burst, at[burst].Sub(t0), burst, interval)
	}
	if !at[40].Equal(t0.Add(time.Minute)) || !at[44].Equal(t0.Add(time.Minute)) {
		t.Errorf("after a refill the burst goes at once: #40 at %v, #44 at %v", at[40].Sub(t0), at[44].Sub(t0))
	}
}

func max64(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// fakeReapSession answers every reap with outcome, and records when.
type fakeReapSession struct {
	mu      sync.Mutex
	at      []time.Time
	ids     []uint32
	outcome func(o orphan) (reapOutcome, error)
	closes  int
}

func (f *fakeReapSession) reap(_ context.Context, o orphan) (reapOutcome, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.at = append(f.at, time.Now())
	f.ids = append(f.ids, o.id)
	if f.outcome != nil {
		return f.outcome(o)
	}
	return reapEnded, nil
}

func (f *fakeReapSession) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closes++
	return nil
}

// reapConnector is a fake-driver connector whose reaper works through f.
func reapConnector(f *fakeReapSession) (*Connector, *int) {
	c, _ := newFakeConnector(shapePgx, DefaultOptions())
	opens := new(int)
	c.reap.open = func(context.Context) (reapSession, error) {
		*opens++
		return f, nil
	}
	return c, opens
}

func knownOrphan(id uint32) orphan {
	o := testOrphan()
	o.id = id
	return o
}

// TestReaperRateBound: 30 orphans at once are reaped at most reapBurst at
// once and then one per reapInterval, in order, over one connection that
// closes reapLinger after the last; and Close leaves no goroutine (the
// bubble fails on one still blocked).
func TestReaperRateBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeReapSession{}
		c, opens := reapConnector(f)
		start := time.Now()
		for i := range 30 {
			c.reap.enqueue(knownOrphan(uint32(100 + i)))
		}
		time.Sleep(30*reapInterval + 2*reapLinger)
		synctest.Wait()
		s := c.Stats().Reap
		if s.Orphans != 30 || s.Reaped != 30 || s.Failed+s.NotOurs+s.Gone != 0 {
			t.Fatalf("Reap = %+v, want 30 orphans, 30 reaped", s)
		}
		for i, at := range f.at {
			if f.ids[i] != uint32(100+i) {
				t.Fatalf("reap #%d was of %d, want %d: in order", i, f.ids[i], 100+i)
			}
			if earliest := start.Add(time.Duration(max(i-reapBurst+1, 0)) * reapInterval); at.Before(earliest) {
				t.Fatalf("reap #%d at %v, before %v: over the rate", i, at.Sub(start), earliest.Sub(start))
			}
		}
		if *opens != 1 || f.closes != 1 {
			t.Errorf("connections opened %d, closed %d; want 1 and 1 (kept for the burst, closed after)", *opens, f.closes)
		}
		// A later orphan starts the goroutine again; Close stops it.
		c.reap.enqueue(knownOrphan(7))
		c.Close()
		c.reap.enqueue(knownOrphan(8)) // after Close: dropped, no goroutine
		if s := c.Stats().Reap; s.Orphans != 32 {
			t.Errorf("Orphans = %d, want 32: every dead-path discard counts", s.Orphans)
		}
	})
}

// TestReaperPermissionOff: a refused permission is counted once and turns
// reaping off for the pool; the queue behind it is dropped.
func TestReaperPermissionOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeReapSession{outcome: func(orphan) (reapOutcome, error) {
			return reapDenied, errors.New("must be a member of the role whose process is being terminated")
		}}
		c, _ := reapConnector(f)
		for i := range 10 {
			c.reap.enqueue(knownOrphan(uint32(i + 1)))
		}
		time.Sleep(10 * time.Second)
		c.reap.enqueue(knownOrphan(99))
		time.Sleep(10 * time.Second)
		s := c.Stats().Reap
		if s.Failed != 1 || !s.Off || s.Reaped != 0 || s.Orphans != 11 {
			t.Errorf("Reap = %+v, want Failed 1, Off, 11 orphans", s)
		}
		if len(f.at) != 1 {
			t.Errorf("%d attempts, want 1: reaping stops at the first refusal", len(f.at))
		}
		c.Close()
	})
}

// TestReaperOutcomes: each outcome lands in its counter; an orphan
// without an id or address is not ours without asking the server; a full
// queue fails the rest.
func TestReaperOutcomes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeReapSession{outcome: func(o orphan) (reapOutcome, error) {
			switch o.id % 4 {
			case 1:
				return reapNotOurs, nil
			case 2:
				return reapGone, nil
			case 3:
				return reapFailed, errors.New("timeout")
			}
			return reapEnded, nil
		}}
		c, opens := reapConnector(f)
		for i := range 8 {
			c.reap.enqueue(knownOrphan(uint32(i + 1)))
		}
		c.reap.enqueue(orphan{id: 9}) // a Unix socket: no address
		time.Sleep(time.Minute)
		s := c.Stats().Reap
		want := ReapStats{Orphans: 9, Reaped: 2, NotOurs: 3, Gone: 2, Failed: 2}
		if s != want {
			t.Errorf("Reap = %+v, want %+v", s, want)
		}
		if *opens != 3 {
			t.Errorf("connections opened = %d, want 3: one, and a new one after each failure", *opens)
		}
		for i := range reapQueueMax + 20 {
			c.reap.enqueue(knownOrphan(uint32(4 * (i + 1)))) // all would be reaped
		}
		// The goroutine may take up to a burst (and one waiting for its
		// slot) off the queue while the loop runs.
		if s, least := c.Stats().Reap, int64(2+20-reapBurst-1); s.Failed < least {
			t.Errorf("Failed = %d after %d orphans at once, want >= %d: the queue holds %d", s.Failed, reapQueueMax+20, least, reapQueueMax)
		}
		time.Sleep(time.Minute)
		if s := c.Stats().Reap; s.Reaped+s.Failed != 2+2+reapQueueMax+20 {
			t.Errorf("Reap = %+v: %d orphans accounted for, want %d", s, s.Reaped+s.Failed, 2+2+reapQueueMax+20)
		}
		c.Close()
	})
}

// TestDeadPathMarksOrphans: only a dead path leaves an orphan: a checkout
// ping that timed out on its own bound or a kernel timeout does, a reset
// or the caller's own deadline does not.
func TestDeadPathMarksOrphans(t *testing.T) {
	block := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	cases := []struct {
		name     string
		pingErr  func(ctx context.Context) error
		callerTO time.Duration
		execErr  error
		want     int64
	}{
		{name: "ping timed out on PingTimeout", pingErr: block, want: 1},
		{name: "ping failed with ETIMEDOUT", pingErr: func(context.Context) error {
			return &net.OpError{Op: "read", Err: syscall.ETIMEDOUT}
		}, want: 1},
		{name: "ping reset", pingErr: func(context.Context) error {
			return &net.OpError{Op: "read", Err: syscall.ECONNRESET}
		}, want: 0},
		{name: "the caller's deadline", pingErr: block, callerTO: 100 * time.Millisecond, want: 0},
		{name: "statement: user timeout", execErr: &net.OpError{Op: "read", Err: syscall.ETIMEDOUT}, want: 1},
		{name: "statement: unreachable", execErr: &net.OpError{Op: "write", Err: syscall.EHOSTUNREACH}, want: 1},
		{name: "statement: EOF", execErr: driver.ErrBadConn, want: 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := &fakeReapSession{}
				c, fc := newFakeConnector(shapePgx, opts(func(o *Options) { o.Ping = PingAlways }))
				c.reap.open = func(context.Context) (reapSession, error) { return f, nil }
				w, inner := connect(c, fc)
				w.sess = knownOrphan(11)
				ctx := context.Background()
				if tc.callerTO > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, tc.callerTO)
					defer cancel()
				}
				if tc.pingErr != nil {
					inner.pingErr = tc.pingErr
					if err := w.ResetSession(ctx); err == nil {
						t.Fatal("the checkout succeeded")
					}
				} else {
					inner.execErr = tc.execErr
					if _, err := w.ExecContext(ctx, "UPDATE t SET v = 1", nil); err == nil {
						t.Fatal("the statement succeeded")
					}
				}
				w.Close()
				time.Sleep(5 * time.Second)
				s := c.Stats().Reap
				if s.Orphans != tc.want || s.Reaped != tc.want || int64(len(f.at)) != tc.want {
					t.Errorf("Reap = %+v after %d reaps, want %d orphans reaped", s, len(f.at), tc.want)
				}
				c.Close()
			})
		})
	}
}

// TestReapOff: with resilient_reap=off nothing is reaped and no goroutine
// starts, but the orphans are still counted.
func TestReapOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, _ := newFakeConnector(shapePgx, opts(func(o *Options) { o.Reap = false }))
		if c.reap.open != nil {
			t.Fatal("reaping is on with Reap false")
		}
		c.reap.enqueue(knownOrphan(1))
		synctest.Wait()
		if s := c.Stats().Reap; s.Orphans != 1 || !s.Off || s.Reaped+s.Failed != 0 {
			t.Errorf("Reap = %+v, want 1 orphan, off, nothing done", s)
		}
		c.Close()
	})
}

func TestReapOutcomeLabels(t *testing.T) {
	r := ReapStats{Reaped: 1, NotOurs: 2, Gone: 3, Failed: 4}
	want := map[string]int64{"reaped": 1, "not_ours": 2, "gone": 3, "failed": 4}
	got := map[string]int64{}
	for o, n := range r.ByOutcome() {
		got[ReapOutcome(o).String()] = n
	}
	if len(got) != len(want) {
		t.Fatalf("ByOutcome labels %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %d, want %d", k, got[k], v)
		}
	}
}
