package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// TestDiscardCounts: every checkout rejection is counted under its reason,
// once, and logged at debug as conn.discarded with that reason.
func TestDiscardCounts(t *testing.T) {
	cases := []struct {
		reason DiscardReason
		shape  fakeShape
		opts   func(*Options)
		setup  func(*testing.T, *conn, *fakeConn)
	}{
		{DiscardMarkedBad, shapePgx, nil, func(_ *testing.T, w *conn, _ *fakeConn) { w.bad.Store(true) }},
		{DiscardInvalidated, shapePgx, nil, func(_ *testing.T, w *conn, _ *fakeConn) { w.c.invalidate(w.gen, InvalidCrash) }},
		{DiscardMaxAge, shapePgx, func(o *Options) { o.MaxAge = time.Minute }, func(_ *testing.T, w *conn, _ *fakeConn) {
			w.life = lifetime{deadline: time.Now().Add(-time.Nanosecond)}
		}},
		{DiscardMaxIdle, shapePgx, func(o *Options) { o.MaxIdleTime = time.Minute }, func(_ *testing.T, w *conn, _ *fakeConn) {
			w.lastActive = time.Now().Add(-2 * time.Minute)
		}},
		{DiscardServerClosed, shapePgx, nil, func(t *testing.T, w *conn, _ *fakeConn) {
			client, server := tcpPair(t)
			w.sock = newSockCheck(client)
			server.Close()
			waitState(w.sock, sockClosed)
			w.lastActive = time.Now().Add(-2 * peekAfterIdle)
		}},
		{DiscardDriverReset, shapeMySQL, nil, func(_ *testing.T, _ *conn, fc *fakeConn) { fc.resetErr = driver.ErrBadConn }},
		{DiscardPingFailed, shapePgx, func(o *Options) { o.Ping = PingAlways }, func(_ *testing.T, _ *conn, fc *fakeConn) {
			fc.pingErr = func(context.Context) error { return io.ErrUnexpectedEOF }
		}},
	}
	for _, tc := range cases {
		t.Run(tc.reason.String(), func(t *testing.T) {
			o, rec := logged(LogDebug, tc.opts)
			c, f := newFakeConnector(tc.shape, o)
			w, fc := connect(c, f)
			tc.setup(t, w, fc)
			if err := w.ResetSession(context.Background()); err == nil {
				t.Fatal("checkout succeeded, want a discard")
			}
			s := c.Stats()
			if s.Discards[tc.reason] != 1 || s.Discards.Total() != 1 || s.Checkouts != 1 {
				t.Errorf("discards %v, checkouts %d; want one %s of one checkout", s.Discards, s.Checkouts, tc.reason)
			}
			if s.CheckedOut != 0 {
				t.Errorf("a discarded checkout counts as checked out: %d", s.CheckedOut)
			}
			recs := rec.Events("conn.discarded")
			if len(recs) != 1 || recs[0].Attrs["reason"].String() != tc.reason.String() || recs[0].Attrs["at"].String() != "checkout" {
				t.Errorf("conn.discarded records %+v, want one with reason %s", recs, tc.reason)
			}
			if tc.reason == DiscardPingFailed && (s.Pings != 1 || s.PingFailures != 1) {
				t.Errorf("pings %d, failures %d; want 1 and 1", s.Pings, s.PingFailures)
			}
		})
	}
}

// TestReturnRejectedCounts: every refusal at return is counted under its
// reason.
func TestReturnRejectedCounts(t *testing.T) {
	cases := []struct {
		reason DiscardReason
		shape  fakeShape
		setup  func(*conn, *fakeConn)
	}{
		{DiscardMarkedBad, shapePgx, func(w *conn, _ *fakeConn) { w.bad.Store(true) }},
		{DiscardInvalidated, shapePgx, func(w *conn, _ *fakeConn) { w.c.invalidate(w.gen, InvalidReadOnly) }},
		{DiscardMaxAge, shapePgx, func(w *conn, _ *fakeConn) { w.life = lifetime{deadline: time.Now().Add(-time.Nanosecond)} }},
		{DiscardDriverReset, shapeMySQL, func(_ *conn, fc *fakeConn) { fc.valid = false }},
	}
	for _, tc := range cases {
		t.Run(tc.reason.String(), func(t *testing.T) {
			c, f := newFakeConnector(tc.shape, opts(nil))
			w, fc := connect(c, f)
			tc.setup(w, fc)
			if w.IsValid() {
				t.Fatal("IsValid = true")
			}
			if s := c.Stats(); s.ReturnsRejected[tc.reason] != 1 || s.ReturnsRejected.Total() != 1 {
				t.Errorf("returns rejected %v, want one %s", s.ReturnsRejected, tc.reason)
			}
		})
	}
}

// TestCheckoutGauge: connections held through database/sql are counted as
// checked out, fresh ones from their first call, and the oldest checkout's
// age grows while they are held.
func TestCheckoutGauge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, _ := newFakeConnector(shapePgx, opts(nil))
		db := sql.OpenDB(c)
		defer db.Close()
		db.SetMaxIdleConns(5)
		ctx := context.Background()
		var held []*sql.Conn
		for range 3 {
			sc, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := sc.ExecContext(ctx, "SELECT 1"); err != nil {
				t.Fatal(err)
			}
			held = append(held, sc)
		}
		time.Sleep(2 * time.Second)
		s := c.Stats()
		if s.CheckedOut != 3 || s.OldestCheckout != 2*time.Second || s.ConnsOpen != 3 || s.Checkouts != 3 {
			t.Errorf("checked out %d (oldest %v), open %d, checkouts %d; want 3, 2s, 3, 3",
				s.CheckedOut, s.OldestCheckout, s.ConnsOpen, s.Checkouts)
		}
		for _, sc := range held {
			sc.Close()
		}
		holdAndRelease(t, db, 3) // used conns: checked out at ResetSession
		s = c.Stats()
		if s.CheckedOut != 0 || s.OldestCheckout != 0 || s.Checkouts != 6 || s.ConnsOpened != 3 {
			t.Errorf("after release: checked out %d (oldest %v), checkouts %d, opened %d; want 0, 0, 6, 3",
				s.CheckedOut, s.OldestCheckout, s.Checkouts, s.ConnsOpened)
		}
		db.Close()
		if s := c.Stats(); s.ConnsOpen != 0 {
			t.Errorf("after db.Close %d connections open, want 0", s.ConnsOpen)
		}
	})
}

// TestStatementCounts: failed statements are counted by class and by
// whether and why they were retried.
func TestStatementCounts(t *testing.T) {
	c, f := newFakeConnector(shapePgx, opts(nil))
	w, _ := connect(c, f)
	ctx := context.Background()
	w.handleErr(ctx, io.ErrUnexpectedEOF, false)
	w.handleErr(WithIdempotent(ctx), io.EOF, false)
	w.handleErr(ctx, io.EOF, true)
	w.handleErr(ctx, driver.ErrBadConn, false)
	w.handleErr(ctx, errCrash, false)
	s := c.Stats()
	want := RetryCounts{ReasonMayHaveRun: 2, ReasonIdempotent: 1, ReasonInTx: 1, ReasonNotSent: 1}
	if s.Retries != want || s.Retries.Retried() != 2 {
		t.Errorf("retries %v, want %v", s.Retries, want)
	}
	if s.StatementFailures[ClassConnLost] != 4 || s.StatementFailures[ClassShutdown] != 1 || s.StatementFailures.Total() != 5 {
		t.Errorf("statement failures %v", s.StatementFailures)
	}
	if s.Invalidations[InvalidCrash] != 1 || s.Invalidations.Total() != 1 {
		t.Errorf("invalidations %v, want one crash", s.Invalidations)
	}
}

// TestStatsOf finds the connector behind a *sql.DB of this package's, and
// nothing behind any other.
func TestStatsOf(t *testing.T) {
	c, _ := newFakeConnector(shapePgx, opts(nil))
	db := sql.OpenDB(c)
	defer db.Close()
	if _, ok := StatsOf(db); !ok {
		t.Error("StatsOf(sql.OpenDB(connector)) = false")
	}
	other := sql.OpenDB(&fakeConnector{})
	defer other.Close()
	if _, ok := StatsOf(other); ok {
		t.Error("StatsOf(a foreign *sql.DB) = true")
	}
	if _, ok := StatsOf(nil); ok {
		t.Error("StatsOf(nil) = true")
	}
}

// TestEverySessionEnded: a checkout that finds its connection closed peeks
// at the pool's other idle connections; all closed retires the pool at once
// (one invalidation, however many report it), one alive keeps it.
func TestEverySessionEnded(t *testing.T) {
	for _, alive := range []bool{false, true} {
		t.Run(map[bool]string{false: "all-closed", true: "one-alive"}[alive], func(t *testing.T) {
			c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.Ping = PingNever }))
			var ws []*conn
			for i := range 4 {
				w, _ := connect(c, f)
				client, server := tcpPair(t)
				w.sock = newSockCheck(client)
				if !(alive && i == 3) {
					server.Close()
					waitState(w.sock, sockClosed)
				}
				ws = append(ws, w)
			}
			for _, w := range ws {
				w.IsValid()                                       // returned: idle
				w.lastActive = time.Now().Add(-2 * peekAfterIdle) // due for the peek
			}
			// A wave of dead connections a moment ago, in a generation since
			// retired, must not hide these (made after it) from the scan.
			c.track.wave.gen, c.track.wave.at = ws[0].gen+7, time.Now().Add(-500*time.Millisecond)
			err := ws[0].ResetSession(context.Background())
			s := c.Stats()
			if alive {
				if !errors.Is(err, ErrServerClosed) || s.Invalidations.Total() != 0 {
					t.Fatalf("one session alive: %v, invalidations %v; want ErrServerClosed and none", err, s.Invalidations)
				}
				return
			}
			if !errors.Is(err, ErrInvalidated) || s.Invalidations[InvalidShutdown] != 1 {
				t.Fatalf("every session closed: %v, invalidations %v; want ErrInvalidated and one shutdown", err, s.Invalidations)
			}
			// Others reporting the same event later count nothing more.
			if c.invalidate(ws[1].gen, InvalidShutdown) || c.Stats().Invalidations.Total() != 1 {
				t.Errorf("a second report of the same event moved the generation again")
			}
			for _, w := range ws[1:3] {
				if err := w.ResetSession(context.Background()); !errors.Is(err, ErrInvalidated) {
					t.Errorf("an older connection after the invalidation: %v, want ErrInvalidated", err)
				}
			}
		})
	}
}

// TestLeftInTxCounts: a pgx connection still inside a transaction (the
// server's own ReadyForQuery status, from a fake backend) is refused at
// return and discarded at checkout, each counted as left_in_tx where it
// happened and logged as conn.discarded with that reason and place.
func TestLeftInTxCounts(t *testing.T) {
	srv := newWireServer(t, "\x00never") // no query starts with it: the backend never dies
	for _, at := range []string{"checkout", "return"} {
		t.Run(at, func(t *testing.T) {
			o, rec := logged(LogDebug, nil)
			c, err := NewConnector(stdlib.GetDefaultDriver(), o, srv.dsn())
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			dc, err := c.Connect(ctx)
			if err != nil {
				t.Fatal(err)
			}
			w := dc.(*conn)
			defer w.Close()
			if w.pg == nil {
				t.Fatal("the wrapper did not find pgx's connection")
			}
			if _, err := w.ExecContext(ctx, "BEGIN", nil); err != nil {
				t.Fatal(err)
			}
			if st := w.pg.TxStatus(); st != 'T' {
				t.Fatalf("precondition: transaction status %q after BEGIN, want 'T'", st)
			}
			if at == "return" {
				if w.IsValid() {
					t.Fatal("IsValid = true for a connection inside a transaction")
				}
			} else if err := w.ResetSession(ctx); !errors.Is(err, ErrLeftInTx) {
				t.Fatalf("checkout of a connection inside a transaction: %v, want ErrLeftInTx", err)
			}
			s := c.Stats()
			counted, other := s.Discards, s.ReturnsRejected
			if at == "return" {
				counted, other = s.ReturnsRejected, s.Discards
			}
			if counted[DiscardLeftInTx] != 1 || counted.Total() != 1 || other.Total() != 0 {
				t.Errorf("discards at checkout %v, refused at return %v; want exactly one left_in_tx at %s",
					s.Discards, s.ReturnsRejected, at)
			}
			recs := rec.Events("conn.discarded")
			if len(recs) != 1 || recs[0].Attrs["reason"].String() != "left_in_tx" || recs[0].Attrs["at"].String() != at {
				t.Errorf("conn.discarded records %+v, want one with reason left_in_tx at %s", recs, at)
			}
		})
	}
}

// TestGateFailedFast: with resilient_connect_wait=0 every Connect made
// while the server is known down fails at once with a ServerDownError and
// is counted, without dialing; callers allowed to wait for the probe are
// not counted.
func TestGateFailedFast(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.ConnectWait = 0 }))
		f.setConnectErr(errRefused)
		ctx := context.Background()
		for i := range 3 {
			_, err := c.Connect(ctx)
			var sd *ServerDownError
			if !errors.As(err, &sd) {
				t.Fatalf("connect %d while down: %v, want a ServerDownError", i, err)
			}
		}
		s := c.Stats()
		if s.Gate.FailedFast != 3 || s.ConnectAttempts != 1 || s.Gate.State != ServerDown || s.Gate.Outages != 1 {
			t.Errorf("failed fast %d, attempts %d, state %v, outages %d; want 3, 1 (the dial that closed the gate), down, 1",
				s.Gate.FailedFast, s.ConnectAttempts, s.Gate.State, s.Gate.Outages)
		}
	})
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.ConnectWait = 10 * time.Second }))
		f.setConnectErr(errRefused)
		go func() {
			time.Sleep(300 * time.Millisecond)
			f.setConnectErr(nil)
		}()
		var wg sync.WaitGroup
		for range 3 {
			wg.Go(func() {
				if _, err := c.Connect(context.Background()); err != nil {
					t.Errorf("a caller allowed to wait failed: %v", err)
				}
			})
		}
		wg.Wait()
		if s := c.Stats(); s.Gate.FailedFast != 0 || s.Gate.Outages != 1 {
			t.Errorf("waiting callers: failed fast %d, outages %d; want 0 and 1", s.Gate.FailedFast, s.Gate.Outages)
		}
	})
}

// TestReadOnlyRetryCount: a write rejected by a demoted primary, run again
// by database/sql on a new connection, counts one read_only retry, one
// read-only statement failure and one read_only invalidation, and logs
// pool.invalidated at warn with cause read_only. Without rejection the
// same error is an ordinary failure: nothing retried.
func TestReadOnlyRetryCount(t *testing.T) {
	readOnly := &pgconn.PgError{Code: "25006", Message: "cannot execute INSERT in a read-only transaction"}
	for _, reject := range []bool{true, false} {
		t.Run(map[bool]string{true: "reject", false: "allow"}[reject], func(t *testing.T) {
			o, rec := logged(LogWarn, func(o *Options) {
				o.RejectReadOnly = ReadOnlyAllow
				if reject {
					o.RejectReadOnly = ReadOnlyReject
				}
			})
			c, f := newFakeConnector(shapePgx, o)
			f.onNew = func(fc *fakeConn) {
				if fc.id < 3 {
					fc.execErr = readOnly
				}
			}
			db := sql.OpenDB(c)
			defer db.Close()
			db.SetMaxIdleConns(5)
			holdAndRelease(t, db, 3)
			_, err := db.ExecContext(context.Background(), "INSERT INTO t VALUES (1)")
			s := c.Stats()
			if s.StatementFailures[ClassReadOnly] != 1 || s.StatementFailures.Total() != 1 {
				t.Errorf("statement failures %v, want one read_only", s.StatementFailures)
			}
			if !reject {
				if !errors.Is(err, readOnly) {
					t.Errorf("exec: %v, want the read-only error", err)
				}
				if s.Retries != (RetryCounts{}) || s.Invalidations.Total() != 0 || len(rec.Events("pool.invalidated")) != 0 {
					t.Errorf("not rejecting: retries %v, invalidations %v; want none", s.Retries, s.Invalidations)
				}
				return
			}
			if err != nil {
				t.Fatalf("write after failover: %v", err)
			}
			if s.Retries[ReasonReadOnly] != 1 || s.Retries.Retried() != 1 || sum(s.Retries[:]) != 1 {
				t.Errorf("retries %v, want exactly one, read_only", s.Retries)
			}
			if s.Invalidations[InvalidReadOnly] != 1 || s.Invalidations.Total() != 1 {
				t.Errorf("invalidations %v, want one read_only", s.Invalidations)
			}
			recs := rec.Events("pool.invalidated")
			if len(recs) != 1 || recs[0].Level != slog.LevelWarn || recs[0].Attrs["cause"].String() != "read_only" {
				t.Errorf("pool.invalidated records %+v, want one at warn with cause read_only", recs)
			}
		})
	}
}
