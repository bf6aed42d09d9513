package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
)

// TestStatementErrorTells: a statement whose connection failed comes back
// as a *StatementError that says whether and why it was retried, while
// errors.Is and errors.As still find the driver's own error.
func TestStatementErrorTells(t *testing.T) {
	reset := &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
	drivers := []struct {
		name  string
		err   error
		found func(error) bool // errors.Is/As for the driver's own error
	}{
		{"unexpected EOF", io.ErrUnexpectedEOF, func(e error) bool { return errors.Is(e, io.ErrUnexpectedEOF) }},
		{"pgconn 57P01", &pgconn.PgError{Code: "57P01", Message: "terminating connection due to administrator command"},
			func(e error) bool { var pe *pgconn.PgError; return errors.As(e, &pe) && pe.Code == "57P01" }},
		{"mysql 1927", &mysql.MySQLError{Number: 1927, Message: "Connection was killed"},
			func(e error) bool { var me *mysql.MySQLError; return errors.As(e, &me) && me.Number == 1927 }},
		{"net reset", reset, func(e error) bool { var ne net.Error; return errors.As(e, &ne) && errors.Is(e, syscall.ECONNRESET) }},
		{"mysql invalid connection", mysql.ErrInvalidConn, func(e error) bool { return errors.Is(e, mysql.ErrInvalidConn) }},
	}
	steps := []struct {
		name       string
		inTx       bool
		idempotent bool
		policy     RetryPolicy
		reason     RetryReason
		says       []string // the message must contain each
	}{
		{name: "mid-flight", reason: ReasonMayHaveRun,
			says: []string{"in flight", "not retried", "may have executed", "resilientpg.WithIdempotent"}},
		{name: "in a transaction", inTx: true, reason: ReasonInTx,
			says: []string{"inside a transaction", "not retried", "run the whole transaction again"}},
		{name: "retry off", idempotent: true, policy: RetryOff, reason: ReasonRetryOff,
			says: []string{"not retried", "resilient_retry=off"}},
		{name: "idempotent", idempotent: true, reason: ReasonIdempotent,
			says: []string{"idempotent", "retries it on another connection", "up to 3 attempts", "last attempt failed"}},
	}
	for _, d := range drivers {
		for _, s := range steps {
			t.Run(d.name+"/"+s.name, func(t *testing.T) {
				c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.Retry = s.policy }))
				w, _ := connect(c, f)
				ctx := context.Background()
				if s.idempotent {
					ctx = WithIdempotent(ctx)
				}
				err := w.handleErr(ctx, wrap(d.err), s.inTx)
				var se *StatementError
				if !errors.As(err, &se) {
					t.Fatalf("got %T %v, want a *StatementError", err, err)
				}
				if se.Reason != s.reason {
					t.Errorf("reason %v, want %v", se.Reason, s.reason)
				}
				if !d.found(err) {
					t.Errorf("the driver's error is not found through %v", err)
				}
				if got := errors.Is(err, driver.ErrBadConn); got != s.reason.Retried() {
					t.Errorf("errors.Is(err, driver.ErrBadConn) = %v, want %v", got, s.reason.Retried())
				}
				for _, want := range s.says {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("message %q lacks %q", err, want)
					}
				}
				if !strings.HasSuffix(err.Error(), d.err.Error()) {
					t.Errorf("message %q does not end with the driver's %q", err, d.err)
				}
			})
		}
	}
}

// TestStatementErrorLeavesOrdinaryErrors: errors that say nothing about the
// connection come back exactly as the driver returned them.
func TestStatementErrorLeavesOrdinaryErrors(t *testing.T) {
	for _, err := range []error{
		&pgconn.PgError{Code: "23505"}, &pgconn.PgError{Code: "42601"}, &mysql.MySQLError{Number: 1062},
		context.Canceled, context.DeadlineExceeded, &pgconn.PgError{Code: "40001"},
	} {
		c, f := newFakeConnector(shapePgx, opts(nil))
		w, _ := connect(c, f)
		if got := w.handleErr(WithIdempotent(context.Background()), err, false); got != err {
			t.Errorf("%v came back as %v", err, got)
		}
	}
}

// TestStatementErrorThroughDatabaseSQL: what the caller of *sql.DB sees.
func TestStatementErrorThroughDatabaseSQL(t *testing.T) {
	t.Run("lost mid-flight", func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		f.onNew = func(fc *fakeConn) { fc.execErr = io.ErrUnexpectedEOF }
		db := sql.OpenDB(c)
		defer db.Close()
		_, err := db.Exec("INSERT INTO t VALUES (1)")
		var se *StatementError
		if !errors.As(err, &se) || se.Reason != ReasonMayHaveRun || !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("got %v, want a not-retried StatementError around io.ErrUnexpectedEOF", err)
		}
		if n := f.opens.Load(); n != 1 {
			t.Errorf("%d connections opened: a statement that may have run was retried", n)
		}
	})
	t.Run("not sent, every attempt", func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(nil))
		f.onNew = func(fc *fakeConn) { fc.execErr = driver.ErrBadConn }
		db := sql.OpenDB(c)
		defer db.Close()
		_, err := db.Exec("INSERT INTO t VALUES (1)")
		var se *StatementError
		if !errors.As(err, &se) || se.Reason != ReasonNotSent || !strings.Contains(err.Error(), "last attempt failed") {
			t.Fatalf("got %v, want a retried StatementError", err)
		}
		if n := f.opens.Load(); n != 3 {
			t.Errorf("%d connections opened, want database/sql's 3 attempts", n)
		}
	})
}

// TestServerDownErrorCountsAttempts: a connect that gave up says how many
// attempts it made, and keeps both the context's and the server's errors.
func TestServerDownErrorCountsAttempts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.ConnectTimeout = 3 * time.Second }))
		f.setConnectErr(errRefused)
		_, err := c.Connect(context.Background())
		var sde *ServerDownError
		if !errors.As(err, &sde) {
			t.Fatalf("got %T %v, want a *ServerDownError", err, err)
		}
		if int64(sde.Attempts) != c.gate.dials.Load() || sde.Attempts < 3 {
			t.Errorf("Attempts = %d, dials %d: want the same, at least 3 in 3 s with a 1 s backoff cap", sde.Attempts, c.gate.dials.Load())
		}
		if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%v lost the deadline or the refusal", err)
		}
		want := "gave up after " + strconv.Itoa(sde.Attempts) + " attempts"
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q lacks %q", err, want)
		}
	})
}
