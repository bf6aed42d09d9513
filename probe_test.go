package resilientpg

import (
	"context"
	"database/sql/driver"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// Probes of a server that is away or starting: hedging a held probe, a
// probe's patience, the backoff after a refusal, and the pace and overlap
// of probes of a server that is starting up.

// heldConnector is a server behind a proxy that holds every connect made
// while the server is away for hold (HAProxy retrying a refused backend),
// then closes it; once the server is back, connects go through at once.
type heldConnector struct {
	back  atomic.Bool
	hold  time.Duration
	dials atomic.Int64
}

func (h *heldConnector) Connect(ctx context.Context) (driver.Conn, error) {
	h.dials.Add(1)
	if h.back.Load() {
		return &fakeConn{valid: true}, nil
	}
	select {
	case <-time.After(h.hold):
		return nil, fmt.Errorf("failed to receive message: %w", io.ErrUnexpectedEOF)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
func (h *heldConnector) Driver() driver.Driver { return nil }

// TestGateHedgesHeldProbes: a probe held by a proxy must not hold up the
// one that finds the server back. While the running probes hang, another
// starts every hedgeAfter, so the first connect after the server is back
// comes within about that, not when the proxy lets go (3 s later).
func TestGateHedgesHeldProbes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := &heldConnector{hold: 3 * time.Second}
		c := downConnector(t, h) // the server went away
		var wg sync.WaitGroup
		var lastOK atomic.Int64
		start := time.Now()
		for range 20 {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if _, err := c.Connect(ctx); err != nil {
					t.Errorf("Connect: %v", err)
					return
				}
				lastOK.Store(int64(time.Since(start)))
			})
		}
		back := 2 * time.Second
		time.Sleep(back)
		h.back.Store(true)
		wg.Wait()
		took := time.Duration(lastOK.Load()) - back
		hedge := c.gate.hedgeAfter()
		if took > hedge+50*time.Millisecond {
			t.Errorf("all callers connected %v after the server was back, want within a hedge (%v)", took, hedge)
		}
		if n := h.dials.Load(); n > int64(back/hedge)+25 {
			t.Errorf("%d dials: want about one per hedge interval while held, then one per caller", n)
		}
		t.Logf("connected %v after the server was back; %d dials", took, h.dials.Load())
	})
}

// slowConnector accepts every connect, after a while: a server that takes
// seconds to let a client in (a serverless one resuming).
type slowConnector struct {
	delay time.Duration
	dials atomic.Int64
}

func (s *slowConnector) Connect(ctx context.Context) (driver.Conn, error) {
	s.dials.Add(1)
	select {
	case <-time.After(s.delay):
		return &fakeConn{valid: true}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
func (s *slowConnector) Driver() driver.Driver { return nil }

// TestGateProbePatience: a probe is bounded (resilient_ping_timeout) so
// that a held connect cannot stall recovery, but the bound doubles after
// each probe that ran out of it, so a server that takes longer than that
// to accept is still reached, within the caller's deadline.
func TestGateProbePatience(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &slowConnector{delay: 3 * time.Second}
		c := downConnector(t, s)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		start := time.Now()
		if _, err := c.Connect(ctx); err != nil {
			t.Fatalf("Connect: %v", err)
		}
		took := time.Since(start)
		// The first probe gives up at 2 s; the second, allowed 4 s, gets in.
		if took > 6*time.Second || s.dials.Load() > 3 {
			t.Errorf("connected after %v and %d dials, want the second or third probe to get in", took, s.dials.Load())
		}
		if c.Stats().Gate.State != ServerUp {
			t.Errorf("gate %v after a probe got in", c.Stats().Gate.State)
		}
		// The probe that ran out of its bound counts as the address not
		// answering, not as a caller giving up.
		if f := c.Stats().ConnectFailures; f[ClassCannotConnect] != 1 || f[ClassCanceled] != 0 {
			t.Errorf("connect failures %v, want the timed-out probe under cannot_connect", f)
		}
		t.Logf("connected after %v, %d dials", took, s.dials.Load())
	})
}

// TestGateRefusalRestartsBackoff: a server rejects at a cost (too many
// clients), then refuses (it was restarted), then rejects again. The
// refusals show the old process gone, so the backoff starts over instead
// of adding the rejections up to its cap, which would delay the first
// success after the server accepts by up to a second.
func TestGateRefusalRestartsBackoff(t *testing.T) {
	g := &dialGate{interval: 30 * time.Millisecond, bo: backoff{initial: 100 * time.Millisecond, max: time.Second}}
	costly := &pgconn.PgError{Code: "53300", Message: "sorry, too many clients already"}
	for range 5 {
		g.nextProbe(costly)
	}
	require.Equal(t, 5, g.bo.attempt, "costly rejections back off exponentially")
	d := g.nextProbe(errRefused)
	require.LessOrEqual(t, d, 45*time.Millisecond, "a refusal is probed at the interval")
	require.Equal(t, 0, g.bo.attempt, "a refusal restarts the backoff")
	require.LessOrEqual(t, g.nextProbe(costly), 100*time.Millisecond, "the next rejection starts from the initial backoff")
}

// TestGateStartingServerProbedOften: "starting up" is probed at the refusal
// interval for startingWindow after its first sight in an outage, then
// backed off like any costly rejection; "shutting down" is probed every
// four intervals (a restart's new server may follow it at once), and a
// standby without hot_standby is backed off.
func TestGateStartingServerProbedOften(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := &dialGate{interval: 30 * time.Millisecond, bo: backoff{initial: 100 * time.Millisecond, max: time.Second}}
		starting := &pgconn.PgError{Code: "57P03", Message: "the database system is starting up"}
		shutdown := &pgconn.PgError{Code: "57P03", Message: "the database system is shutting down"}
		require.False(t, startingUp(shutdown))
		for range 10 {
			d := g.nextProbe(shutdown)
			require.GreaterOrEqual(t, d, 60*time.Millisecond, "shutting down: four intervals, jittered")
			require.LessOrEqual(t, d, 180*time.Millisecond, "shutting down: four intervals, jittered")
		}
		require.Equal(t, 0, g.bo.attempt, "shutting down is not backed off")
		require.True(t, shuttingDown(&mysql.MySQLError{Number: 1053, Message: "Server shutdown in progress"}))
		standby := &pgconn.PgError{Code: "57P03", Message: "the database system is not accepting connections"}
		require.False(t, startingUp(standby))
		require.False(t, shuttingDown(standby))
		for range 4 {
			g.nextProbe(standby)
		}
		require.Equal(t, 4, g.bo.attempt, "a standby without hot_standby is backed off")
		g.bo.reset()
		require.True(t, startingUp(fmt.Errorf("connect: %w", starting)))
		probes := 0
		for elapsed := time.Duration(0); elapsed < startingWindow; probes++ {
			d := g.nextProbe(starting)
			require.LessOrEqual(t, d, 45*time.Millisecond, "probe %d, %v into the window", probes, elapsed)
			time.Sleep(d)
			elapsed += d
		}
		require.Equal(t, 0, g.bo.attempt, "no backoff inside the window")
		require.LessOrEqual(t, probes, int(startingWindow/(15*time.Millisecond))+1, "at most one probe per half interval")
		for range 3 {
			g.nextProbe(starting)
		}
		require.Equal(t, 3, g.bo.attempt, "past the window, starting up is backed off")

		// Recovery ends the outage: the next one gets a window of its own.
		g.open(time.Now())
		require.LessOrEqual(t, g.nextProbe(starting), 45*time.Millisecond)
	})
}

// TestGateOpenKeepsLaterProbes: when a probe gets through, a probe that
// began dialing before it hangs on something the winner did not and is
// called off, as is one still waiting for its time; one that began after
// it dials a server that answers and goes on.
func TestGateOpenKeepsLaterProbes(t *testing.T) {
	g := &dialGate{}
	now := time.Now()
	winner := now.Add(-100 * time.Millisecond)
	stopped := map[string]bool{}
	for name, start := range map[string]time.Time{
		"earlier": winner.Add(-time.Millisecond),
		"later":   winner.Add(50 * time.Millisecond),
		"waiting": now.Add(time.Second),
	} {
		g.running = append(g.running, &probeRun{start: start, stop: func() { stopped[name] = true }})
	}
	g.open(winner)
	require.Equal(t, map[string]bool{"earlier": true, "waiting": true}, stopped)
}

// startingConnector is a server that restarts: refused until up, then
// "starting up" (each rejection after rtt, the cost of the process it
// forks) until ready, then accepting after rtt.
type startingConnector struct {
	up, ready time.Time
	rtt       time.Duration
	dials     atomic.Int64
	inFlight  atomic.Int64
	mostAtO   atomic.Int64 // the most dials in flight at once that began before ready
	starting  atomic.Int64 // dials that began while starting up
}

func (s *startingConnector) Connect(ctx context.Context) (driver.Conn, error) {
	s.dials.Add(1)
	if time.Now().Before(s.ready) { // probes: once ready, every caller dials
		n := s.inFlight.Add(1)
		defer s.inFlight.Add(-1)
		for {
			m := s.mostAtO.Load()
			if n <= m || s.mostAtO.CompareAndSwap(m, n) {
				break
			}
		}
	}
	if time.Now().Before(s.up) {
		return nil, errRefused
	}
	ready := !time.Now().Before(s.ready)
	if !ready {
		s.starting.Add(1)
	}
	select {
	case <-time.After(s.rtt):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if !ready {
		return nil, &pgconn.PgError{Severity: "FATAL", Code: "57P03", Message: "the database system is starting up"}
	}
	return &fakeConn{valid: true}, nil
}
func (s *startingConnector) Driver() driver.Driver { return nil }

// TestGateStartingServerOverlapsProbes: a rejection that takes longer than
// the probe interval (80 ms against 30) must not set the pace while the
// server starts: probes overlap, so the first success comes within about
// one interval plus a connect of the server becoming ready, with at most
// maxStartingProbes in flight and one probe per interval.
func TestGateStartingServerOverlapsProbes(t *testing.T) {
	const rtt = 80 * time.Millisecond
	var worst time.Duration
	var mostStarting int64
	for range 10 { // the probes' jitter decides where the last rejection falls
		synctest.Test(t, func(t *testing.T) {
			start := time.Now()
			s := &startingConnector{up: start.Add(time.Second), ready: start.Add(1500 * time.Millisecond), rtt: rtt}
			c := downConnector(t, s)
			var wg sync.WaitGroup
			var firstOK atomic.Int64
			for range 10 {
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					if _, err := c.Connect(ctx); err != nil {
						t.Errorf("Connect: %v", err)
						return
					}
					firstOK.CompareAndSwap(0, int64(time.Since(s.ready)))
				})
			}
			wg.Wait()
			worst = max(worst, time.Duration(firstOK.Load()))
			if m := s.mostAtO.Load(); m > maxStartingProbes {
				t.Errorf("%d probes in flight at once while starting, want at most %d", m, maxStartingProbes)
			}
			// One probe per interval on average: at most one per half
			// interval over the 500 ms the server starts.
			if n := s.starting.Load(); n > 500/15+1 {
				t.Errorf("%d probes while the server started (500 ms), want at most %d", n, 500/15+1)
			}
			mostStarting = max(mostStarting, s.starting.Load())
		})
	}
	// The last rejected probe may start just before ready; the next starts
	// at most 1.5 intervals after it and takes one rtt. Without the overlap
	// it would wait for that rejection first: up to 1.5 intervals and two
	// rtts.
	if want := 45*time.Millisecond + rtt + time.Millisecond; worst > want {
		t.Errorf("first success up to %v after the server was ready, want within 1.5 intervals and a connect (%v)", worst, want)
	}
	t.Logf("first success at most %v after ready, at most %d probes in the 500 ms of starting up, over 10 restarts", worst, mostStarting)
}

// downConnector wraps inner with the default options and its gate closed,
// as after a refused dial: the server went away.
func downConnector(t *testing.T, inner driver.Connector) *Connector {
	t.Helper()
	c, err := NewConnector(inner, opts(nil))
	if err != nil {
		t.Fatal(err)
	}
	c.gate.mu.Lock()
	c.gate.close(errRefused)
	c.gate.mu.Unlock()
	return c
}
