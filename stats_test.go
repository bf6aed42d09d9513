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
