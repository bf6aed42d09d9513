package resilientpg

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

var errRefused = fmt.Errorf("dial: %w", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)})

func (f *fakeConnector) setConnectErr(err error) {
	f.mu.Lock()
	f.connectErr = err
	f.mu.Unlock()
}

func TestBackoffBounds(t *testing.T) {
	b := backoff{initial: 100 * time.Millisecond, max: time.Second}
	for n := range 200 {
		d := b.next()
		ceil := min(time.Second, 100*time.Millisecond<<min(n, 20))
		if d < 0 || d > ceil {
			t.Fatalf("wait %d = %v, want within [0, %v]", n, d, ceil)
		}
	}
	// Full jitter: draws at the cap spread over the whole range.
	b = backoff{initial: time.Second, max: time.Second}
	var low, high int
	for range 2000 {
		switch d := b.next(); {
		case d < 250*time.Millisecond:
			low++
		case d > 750*time.Millisecond:
			high++
		}
	}
	if low < 350 || high < 350 {
		t.Fatalf("draws not spread over [0, cap]: %d below 25%%, %d above 75%%", low, high)
	}
	// A huge attempt count must not overflow into a negative or zero ceiling.
	b = backoff{initial: time.Hour, max: 2 * time.Hour, attempt: 70}
	if d := b.next(); d < 0 || d > 2*time.Hour {
		t.Fatalf("overflowing attempt: %v", d)
	}
}

// TestGateSingleFlight: while the server is down, 50 concurrent Connect
// calls cause one dial per probe, not one per caller, at the pace the
// failure's cost allows: a refusal (nothing listens) at the probe interval
// (30 ms on average: at most 40 a second), a rejection that costs the
// server work (too many connections) with exponential backoff to the 1 s
// cap (at most 5 a second), a live standby where a primary is wanted at
// four intervals. Once the server accepts, all of them connect within one
// wait of that pace.
func TestGateSingleFlight(t *testing.T) {
	tooMany := &pgconn.PgError{Severity: "FATAL", Code: "53300", Message: "sorry, too many clients already"}
	standby := &targetMismatchError{errors.New("read only connection")}
	for _, tc := range []struct {
		name       string
		err        error
		maxPerSec  float64       // dials a second while down, at most
		minPerSec  float64       // and at least: the pace is not slower than promised either
		recoverMax time.Duration // all callers connected within this of recovery
	}{
		{"refused", errRefused, 40, 25, 45 * time.Millisecond},
		{"too many clients", tooMany, 5, 1, time.Second},
		{"standby", standby, 10, 6, 180 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c, f := newFakeConnector(shapePgx, opts(nil))
				f.setConnectErr(tc.err)
				const callers = 50
				outage := 5 * time.Second
				var wg sync.WaitGroup
				var lastOK atomic.Int64
				start := time.Now()
				for range callers {
					wg.Go(func() {
						ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
						defer cancel()
						if _, err := c.Connect(ctx); err != nil {
							t.Errorf("Connect: %v", err)
							return
						}
						lastOK.Store(int64(time.Since(start)))
					})
				}
				time.Sleep(time.Millisecond)
				firstWave := c.gate.dials.Load()
				time.Sleep(outage - time.Millisecond)
				during := c.gate.dials.Load() - firstWave
				f.setConnectErr(nil)
				wg.Wait()
				if firstWave > callers {
					t.Errorf("first wave: %d dials, want at most one per caller", firstWave)
				}
				rate := float64(during) / outage.Seconds()
				if rate > tc.maxPerSec || rate < tc.minPerSec {
					t.Errorf("%d dials during a %v outage with %d waiting callers (%.1f/s): want %.0f to %.0f a second",
						during, outage, callers, rate, tc.minPerSec, tc.maxPerSec)
				}
				if took := time.Duration(lastOK.Load()) - outage; took > tc.recoverMax {
					t.Errorf("last caller connected %v after recovery, want within %v", took, tc.recoverMax)
				}
				t.Logf("first wave %d dials, %d during the outage (%.1f/s), all %d connected %v after recovery",
					firstWave, during, rate, callers, time.Duration(lastOK.Load())-outage)
			})
		})
	}
}

// TestGateRestartInvalidates: refused then accepted means a new server:
// connections made before are discarded at checkout without a ping.
func TestGateRestartInvalidates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		old, fc := connect(c, f)
		f.setConnectErr(errRefused)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		go func() {
			time.Sleep(2 * time.Second)
			f.setConnectErr(nil)
		}()
		dc, err := c.Connect(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := old.ResetSession(ctx); !errors.Is(err, ErrInvalidated) {
			t.Fatalf("old conn checkout: %v, want ErrInvalidated", err)
		}
		if fc.pings.Load() != 0 {
			t.Error("an invalidated conn was pinged")
		}
		if old.IsValid() {
			t.Error("an invalidated conn is valid")
		}
		if err := dc.(*conn).ResetSession(ctx); err != nil {
			t.Errorf("the new server's conn: %v", err)
		}
	})
}

// TestGateRestartBehindProxyInvalidates: behind a proxy a stopped server
// accepts the TCP connection and resets the handshake; recovery after that
// is a restart too.
func TestGateRestartBehindProxyInvalidates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		old, _ := connect(c, f)
		f.setConnectErr(fmt.Errorf("failed to receive message: %w", io.ErrUnexpectedEOF))
		go func() {
			time.Sleep(time.Second)
			f.setConnectErr(nil)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		if err := old.ResetSession(ctx); !errors.Is(err, ErrInvalidated) {
			t.Fatalf("old conn after a handshake-reset outage: %v, want ErrInvalidated", err)
		}
	})
}

// TestGateTooManyConnsKeepsPool: recovering from "too many connections"
// is not a restart; the pool is kept.
func TestGateTooManyConnsKeepsPool(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		old, _ := connect(c, f)
		f.setConnectErr(&pgconn.PgError{Code: "53300"})
		go func() {
			time.Sleep(time.Second)
			f.setConnectErr(nil)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		if err := old.ResetSession(ctx); err != nil {
			t.Fatalf("old conn discarded after a too-many-connections spell: %v", err)
		}
	})
}

func TestGateFailsFast(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		// Auth errors: one dial, at once.
		c, f := newFakeConnector(shapePgx, opts(nil))
		f.setConnectErr(&pgconn.PgError{Code: "28P01"})
		start := time.Now()
		if _, err := c.Connect(ctx); Classify(err) != ClassAuth || time.Since(start) != 0 || c.gate.dials.Load() != 1 {
			t.Errorf("auth error: err %v after %v and %d dials, want at once after 1", err, time.Since(start), c.gate.dials.Load())
		}
		// resilient_connect_wait=0: the second caller fails at once while down.
		c, f = newFakeConnector(shapePgx, opts(func(o *Options) { o.ConnectWait = 0 }))
		f.setConnectErr(errRefused)
		_, err := c.Connect(ctx)
		var sde *ServerDownError
		if !errors.As(err, &sde) || !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) != 0 {
			t.Errorf("connect_wait=0: err %v after %v, want a ServerDownError at once", err, time.Since(start))
		}
		// No deadline: ConnectTimeout bounds the wait.
		c, f = newFakeConnector(shapePgx, opts(func(o *Options) { o.ConnectTimeout = 3 * time.Second }))
		f.setConnectErr(errRefused)
		start = time.Now()
		_, err = c.Connect(ctx)
		if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) != 3*time.Second {
			t.Errorf("no deadline: err %v after %v, want DeadlineExceeded and the refusal after 3s", err, time.Since(start))
		}
	})
}

// TestGateFailFastStillRecovers: with resilient_connect_wait=0 requests
// fail at once while the server is down, but a probe still goes out when
// its backoff slot comes, so the gate opens again once the server is back.
func TestGateFailFastStillRecovers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.ConnectWait = 0 }))
		f.setConnectErr(errRefused)
		ctx := context.Background()
		start := time.Now()
		_, err := c.Connect(ctx) // closes the gate
		var sde *ServerDownError
		if !errors.As(err, &sde) && !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("first connect: %v", err)
		}
		dials := c.gate.dials.Load()
		if _, err := c.Connect(ctx); !errors.As(err, &sde) || c.gate.dials.Load() != dials {
			t.Fatalf("while down and before the next slot: err %v, %d new dials; want ServerDownError and no dial", err, c.gate.dials.Load()-dials)
		}
		if !sde.Since.Equal(start) {
			t.Errorf("ServerDownError.Since = %v, want when the gate closed (%v)", sde.Since, start)
		}
		f.setConnectErr(nil)
		time.Sleep(time.Second) // past any backoff slot (cap 1s)
		if _, err := c.Connect(ctx); err != nil {
			t.Fatalf("after the server came back: %v", err)
		}
		if _, err := c.Connect(ctx); err != nil {
			t.Fatalf("gate did not open: %v", err)
		}
	})
}

// TestGateSuspectSingleProbe: once a pooled conn reports a lost server,
// the requests that need new conns send one probe and wait for it.
func TestGateSuspectSingleProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		w, _ := connect(c, f)
		f.setConnectErr(errRefused) // the server went away
		w.handleErr(context.Background(), io.ErrUnexpectedEOF, false)
		before := c.gate.dials.Load()
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if _, err := c.Connect(ctx); err != nil {
					t.Errorf("Connect: %v", err)
				}
			})
		}
		time.Sleep(time.Millisecond)
		if n := c.gate.dials.Load() - before; n != 1 {
			t.Errorf("%d dials right after the disconnect, want 1 probe", n)
		}
		f.setConnectErr(nil)
		wg.Wait()
	})
}

func TestSideDialsBlockedOnlyWhileDown(t *testing.T) {
	synctest.Test(t, testSideDials)
}

func testSideDials(t *testing.T) {
	g := &dialGate{bo: backoff{initial: 100 * time.Millisecond, max: time.Second}, c: &Connector{}}
	ours := context.WithValue(context.Background(), connectKey{}, true)
	side := context.Background()
	if g.sideDialsBlocked(side) {
		t.Fatal("side dial blocked while the gate is open")
	}
	g.mu.Lock()
	g.close(errRefused)
	g.mu.Unlock()
	if !g.sideDialsBlocked(side) || g.sideDialsBlocked(ours) {
		t.Fatal("while down: side dials must be skipped, the wrapper's own must not")
	}
	g.mu.Lock()
	g.open(time.Now())
	g.mu.Unlock()
	if g.sideDialsBlocked(side) {
		t.Fatal("side dial blocked after recovery")
	}
	// A disconnect: skipped for one backoff cap, then allowed again even if
	// no probe ran.
	g.suspect()
	if !g.sideDialsBlocked(side) || g.sideDialsBlocked(ours) {
		t.Fatal("right after a disconnect: side dials must be skipped, the wrapper's own must not")
	}
	time.Sleep(time.Second)
	if g.sideDialsBlocked(side) {
		t.Fatal("side dials still skipped a backoff cap after the disconnect")
	}
}
