package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

func opts(mod func(*Options)) Options {
	o := DefaultOptions()
	o.MaxAgeJitter = Jitter{}
	if mod != nil {
		mod(&o)
	}
	return o
}

var (
	errBoom          = errors.New("boom")
	errCrash         = &pgconn.PgError{Severity: "FATAL", Code: "57P02"}
	errAdminShutdown = &pgconn.PgError{Severity: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"}
)

// TestResetSessionBranches walks every checkout branch in virtual time.
func TestResetSessionBranches(t *testing.T) {
	type want struct {
		err       error // matched with errors.Is; nil means success
		badConn   bool  // the error wraps driver.ErrBadConn
		pings     int64
		innerRsts int64
		valid     bool // IsValid afterwards

		invalidated bool // the pool generation moved
	}
	cases := []struct {
		name  string
		shape fakeShape
		opts  func(*Options)
		setup func(*fakeConn, *conn)
		idle  time.Duration
		ctx   func() (context.Context, context.CancelFunc)
		want  want
	}{
		{name: "used a moment ago: no ping", idle: 10 * time.Millisecond,
			want: want{innerRsts: 1, valid: true}},
		{name: "idle past ping_idle: ping", idle: 1500 * time.Millisecond,
			want: want{pings: 1, innerRsts: 1, valid: true}},
		{name: "idle exactly ping_idle: ping", idle: time.Second,
			want: want{pings: 1, innerRsts: 1, valid: true}},
		{name: "always pings", opts: func(o *Options) { o.Ping = PingAlways },
			want: want{pings: 1, innerRsts: 1, valid: true}},
		{name: "never pings", opts: func(o *Options) { o.Ping = PingNever }, idle: 20 * time.Minute,
			want: want{innerRsts: 1, valid: true}},
		{name: "returned before another lost its server: ping", idle: 10 * time.Millisecond,
			setup: func(_ *fakeConn, c *conn) { c.c.lost(c.lastActive, false) },
			want:  want{pings: 1, innerRsts: 1, valid: true}},
		{name: "returned before a loss, ping dead: discard before any statement", idle: 10 * time.Millisecond,
			setup: func(f *fakeConn, c *conn) {
				c.c.lost(c.lastActive, false)
				f.pingErr = func(context.Context) error { return io.EOF }
			},
			want: want{err: io.EOF, badConn: true, pings: 1, innerRsts: 1}},
		{name: "returned before a loss, policy never: no ping", opts: func(o *Options) { o.Ping = PingNever }, idle: 10 * time.Millisecond,
			setup: func(_ *fakeConn, c *conn) { c.c.lost(c.lastActive, false) },
			want:  want{innerRsts: 1, valid: true}},
		{name: "returned after a lost connection: no ping", idle: 10 * time.Millisecond,
			setup: func(_ *fakeConn, c *conn) { c.c.lost(c.lastActive.Add(-time.Millisecond), false) },
			want:  want{innerRsts: 1, valid: true}},
		{name: "returned after the server ended a session: ping", idle: 10 * time.Millisecond,
			setup: func(_ *fakeConn, c *conn) { c.c.lost(c.lastActive.Add(-time.Millisecond), true) },
			want:  want{pings: 1, innerRsts: 1, valid: true}},
		{name: "server ended a session, ping sees the farewell: discard before any statement", idle: 10 * time.Millisecond,
			setup: func(f *fakeConn, c *conn) {
				c.c.lost(c.lastActive.Add(-time.Millisecond), true)
				f.pingErr = func(context.Context) error { return errAdminShutdown }
			},
			want: want{err: errAdminShutdown, badConn: true, pings: 1, innerRsts: 1}},
		{name: "server ended a session over lossPeekWindow ago: no ping", idle: 1001 * time.Millisecond,
			opts:  func(o *Options) { o.PingIdle = 2 * time.Second },
			setup: func(_ *fakeConn, c *conn) { c.c.lost(c.lastActive.Add(-time.Millisecond), true) },
			want:  want{innerRsts: 1, valid: true}},
		{name: "server ended a session, policy never: no ping", opts: func(o *Options) { o.Ping = PingNever }, idle: 10 * time.Millisecond,
			setup: func(_ *fakeConn, c *conn) { c.c.lost(c.lastActive.Add(-time.Millisecond), true) },
			want:  want{innerRsts: 1, valid: true}},
		{name: "past max age: discard without ping", opts: func(o *Options) { o.MaxAge = time.Minute },
			idle: time.Minute, want: want{err: ErrMaxAge, badConn: true}},
		{name: "idle past max idle: discard without ping", opts: func(o *Options) { o.MaxIdleTime = 10 * time.Second },
			idle: 11 * time.Second, want: want{err: ErrMaxIdle, badConn: true, valid: true}},
		{name: "ping fails: discard with the cause", idle: 2 * time.Second,
			setup: func(f *fakeConn, _ *conn) { f.pingErr = func(context.Context) error { return io.EOF } },
			want:  want{err: io.EOF, badConn: true, pings: 1, innerRsts: 1}},
		{name: "ping sees a crash: the pool is retired too", idle: 2 * time.Second,
			setup: func(f *fakeConn, _ *conn) {
				f.pingErr = func(context.Context) error { return errCrash }
			},
			want: want{err: errCrash, badConn: true, pings: 1, innerRsts: 1, invalidated: true}},
		{name: "inner reset says bad", setup: func(f *fakeConn, _ *conn) { f.resetErr = driver.ErrBadConn },
			want: want{err: driver.ErrBadConn, badConn: true, innerRsts: 1}},
		{name: "inner reset other error passes through", setup: func(f *fakeConn, _ *conn) { f.resetErr = errBoom },
			want: want{err: errBoom, innerRsts: 1, valid: true}},
		{name: "marked bad by a failed query", setup: func(_ *fakeConn, c *conn) { c.handleErr(context.Background(), driver.ErrBadConn, false) },
			want: want{err: ErrMarkedBad, badConn: true}},
		{name: "caller's ctx already ended: keep conn, no ping", idle: 2 * time.Second,
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				return ctx, cancel
			},
			want: want{err: context.Canceled, innerRsts: 1, valid: true}},
		{name: "bare driver without Pinger: no ping possible", shape: shapeBare, opts: func(o *Options) { o.Ping = PingAlways },
			want: want{valid: true}},
		{name: "mysql-like: inner Validator false means invalid", shape: shapeMySQL,
			setup: func(f *fakeConn, _ *conn) { f.valid = false }, want: want{innerRsts: 1, valid: false}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c, f := newFakeConnector(tc.shape, opts(tc.opts))
				w, fc := connect(c, f)
				if tc.setup != nil {
					tc.setup(fc, w)
				}
				time.Sleep(tc.idle)
				ctx, cancel := context.Background(), context.CancelFunc(func() {})
				if tc.ctx != nil {
					ctx, cancel = tc.ctx()
				}
				defer cancel()
				gen := c.gen.Load()
				err := w.ResetSession(ctx)
				if got := c.gen.Load() != gen; got != tc.want.invalidated {
					t.Errorf("pool invalidated = %v, want %v", got, tc.want.invalidated)
				}
				switch {
				case tc.want.err == nil && err != nil:
					t.Fatalf("ResetSession = %v, want nil", err)
				case tc.want.err != nil && !errors.Is(err, tc.want.err):
					t.Fatalf("ResetSession = %v, want one wrapping %v", err, tc.want.err)
				}
				if got := errors.Is(err, driver.ErrBadConn); got != tc.want.badConn {
					t.Errorf("errors.Is(err, ErrBadConn) = %v, want %v (err %v)", got, tc.want.badConn, err)
				}
				if got := fc.pings.Load(); got != tc.want.pings {
					t.Errorf("pings = %d, want %d", got, tc.want.pings)
				}
				if got := fc.resets.Load(); got != tc.want.innerRsts {
					t.Errorf("inner resets = %d, want %d", got, tc.want.innerRsts)
				}
				if tc.want.badConn && tc.want.err != ErrMaxIdle {
					// A discarded conn must not come back through IsValid either.
					tc.want.valid = false
				}
				if got := w.IsValid(); got != tc.want.valid {
					t.Errorf("IsValid = %v, want %v", got, tc.want.valid)
				}
			})
		})
	}
}

// TestServerEndedStatementPingsOthers: a statement whose session the
// server ended (57P01) makes the next checkout of another connection, used
// after that loss, ping; a statement that lost its connection otherwise
// (EOF) leaves such a connection to the peek alone.
func TestServerEndedStatementPingsOthers(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		pings int64
	}{
		{"ended by the server", errAdminShutdown, 1},
		{"connection lost", io.ErrUnexpectedEOF, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c, f := newFakeConnector(shapePgx, opts(nil))
				a, _ := connect(c, f)
				b, fb := connect(c, f)
				time.Sleep(10 * time.Millisecond)
				a.handleErr(context.Background(), tc.err, false)
				time.Sleep(time.Millisecond)
				b.lastActive = time.Now() // b served a statement after the loss
				time.Sleep(10 * time.Millisecond)
				if err := b.ResetSession(context.Background()); err != nil {
					t.Fatalf("ResetSession = %v", err)
				}
				if got := fb.pings.Load(); got != tc.pings {
					t.Errorf("pings = %d, want %d", got, tc.pings)
				}
			})
		})
	}
}

// TestPingTimeoutBound checks that a checkout ping is bounded by the smaller
// of the caller's deadline and PingTimeout, and that a ping cut short by the
// caller keeps a healthy conn while one cut by PingTimeout discards it.
func TestPingTimeoutBound(t *testing.T) {
	block := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	cases := []struct {
		name         string
		shape        fakeShape
		callerTO     time.Duration // 0: no caller deadline
		survives     bool          // for mysql-like: IsValid after the interruption
		wantDeadline time.Duration // ping ctx deadline, from checkout
		wantCaller   bool          // the caller's ctx error is returned
	}{
		{name: "no caller deadline: PingTimeout bounds", shape: shapePgx, wantDeadline: 2 * time.Second},
		{name: "caller deadline longer: PingTimeout bounds", shape: shapePgx, callerTO: time.Minute, wantDeadline: 2 * time.Second},
		{name: "caller deadline shorter, conn survives: caller's error, conn kept", shape: shapeMySQL,
			callerTO: 100 * time.Millisecond, survives: true, wantDeadline: 100 * time.Millisecond, wantCaller: true},
		{name: "caller deadline shorter, conn broken: discard", shape: shapeMySQL,
			callerTO: 100 * time.Millisecond, wantDeadline: 100 * time.Millisecond},
		{name: "caller deadline shorter, cannot tell: discard", shape: shapePgx,
			callerTO: 100 * time.Millisecond, wantDeadline: 100 * time.Millisecond},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c, f := newFakeConnector(tc.shape, opts(func(o *Options) { o.Ping = PingAlways }))
				w, fc := connect(c, f)
				fc.pingErr = func(ctx context.Context) error {
					err := block(ctx)
					fc.valid = tc.survives
					return err
				}
				ctx := context.Background()
				if tc.callerTO > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, tc.callerTO)
					defer cancel()
				}
				start := time.Now()
				err := w.ResetSession(ctx)
				dl, ok := fc.pingCtx.Deadline()
				if !ok || dl.Sub(start) != tc.wantDeadline {
					t.Errorf("ping deadline = %v after checkout, want %v", dl.Sub(start), tc.wantDeadline)
				}
				if tc.wantCaller {
					if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, driver.ErrBadConn) {
						t.Fatalf("err = %v, want the caller's DeadlineExceeded without ErrBadConn", err)
					}
					if !w.IsValid() {
						t.Error("a conn that survived the caller's cancellation was condemned")
					}
					return
				}
				if !errors.Is(err, driver.ErrBadConn) {
					t.Fatalf("err = %v, want ErrBadConn", err)
				}
				if w.IsValid() {
					t.Error("a conn whose ping failed is still valid")
				}
			})
		})
	}
}

// TestIdleMeasuredFromReturn: a conn held for a long query and returned a
// moment ago is not idle, so it is not pinged at its next checkout.
func TestIdleMeasuredFromReturn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		w, fc := connect(c, f)
		time.Sleep(10 * time.Minute) // a long query
		if !w.IsValid() {
			t.Fatal("IsValid = false")
		}
		time.Sleep(100 * time.Millisecond)
		if err := w.ResetSession(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := fc.pings.Load(); n != 0 {
			t.Fatalf("pings = %d, want 0: idle must be measured from the return", n)
		}
		time.Sleep(2 * time.Second) // checkout stamped too: now idle again
		if err := w.ResetSession(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := fc.pings.Load(); n != 1 {
			t.Fatalf("pings = %d, want 1", n)
		}
	})
}

func TestIsValid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.MaxAge = time.Minute }))
		w, _ := connect(c, f)
		if !w.IsValid() {
			t.Fatal("fresh conn invalid")
		}
		time.Sleep(59 * time.Second)
		if !w.IsValid() {
			t.Fatal("conn invalid before its max age")
		}
		time.Sleep(time.Second)
		if w.IsValid() {
			t.Fatal("conn valid at its max age")
		}
		w2, _ := connect(c, f)
		if w2.handleErr(context.Background(), errBoom, false); !w2.IsValid() {
			t.Fatal("an ordinary error marked the conn bad")
		}
		if w2.handleErr(context.Background(), driver.ErrBadConn, false); w2.IsValid() {
			t.Fatal("ErrBadConn did not mark the conn bad")
		}
	})
}

// TestDiscardThroughDatabaseSQL: database/sql discards every conn the
// checkout condemns and the caller's query still succeeds.
func TestDiscardThroughDatabaseSQL(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		f.onNew = func(fc *fakeConn) {
			if fc.id < 5 {
				fc.pingErr = func(context.Context) error { return io.ErrUnexpectedEOF }
			}
		}
		db := sql.OpenDB(c)
		defer db.Close()
		db.SetMaxIdleConns(5)
		ctx := context.Background()
		holdAndRelease(t, db, 5)
		time.Sleep(2 * time.Second) // idle: every checkout pings, and the first 5 conns fail it
		for i := range 3 {
			var id int64
			if err := db.QueryRowContext(ctx, "q").Scan(&id); err != nil {
				t.Fatalf("query %d failed: %v", i, err)
			}
			if id < 5 {
				t.Fatalf("query %d ran on dead conn %d", i, id)
			}
		}
		// The first query met two dead conns (database/sql's two cached
		// attempts) and then got a new one, which the next queries reuse.
		if got := f.closes.Load(); got != 2 {
			t.Errorf("closed conns = %d, want 2", got)
		}
	})
}

// TestJitterSpread: deadlines are drawn uniformly over [max-jitter, max].
func TestJitterSpread(t *testing.T) {
	const n, buckets = 20000, 10
	for _, j := range []Jitter{JitterPercent(10), JitterDuration(3 * time.Minute)} {
		maxAge := 30 * time.Minute
		spread := j.of(maxAge)
		var counts [buckets]int
		now := time.Now()
		for range n {
			age := newLifetime(now, maxAge, j).deadline.Sub(now)
			if age > maxAge || age < maxAge-spread {
				t.Fatalf("jitter %v: age %v outside [%v, %v]", j, age, maxAge-spread, maxAge)
			}
			b := int(float64(maxAge-age) / float64(spread) * buckets)
			counts[min(b, buckets-1)]++
		}
		for i, got := range counts {
			if want := n / buckets; got < want*8/10 || got > want*12/10 {
				t.Errorf("jitter %v: bucket %d has %d draws, want about %d: not uniform (%v)", j, i, got, want, counts)
			}
		}
	}
	if l := newLifetime(time.Now(), 0, JitterPercent(10)); l.expired(time.Now().Add(1000 * time.Hour)) {
		t.Error("max age 0 must never expire")
	}
	if l := newLifetime(time.Now(), time.Minute, Jitter{}); time.Until(l.deadline) > time.Minute {
		t.Error("no jitter: deadline past max age")
	}
}
