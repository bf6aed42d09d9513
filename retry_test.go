package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"testing"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
)

// notSentError is how pgconn marks an error that happened before anything
// was written.
type notSentError struct{}

func (notSentError) Error() string     { return "dial: connection refused before send" }
func (notSentError) SafeToRetry() bool { return true }

// TestRetryGuards is the guard table: which failures the wrapper turns into
// a retry (an error wrapping driver.ErrBadConn) and which it returns as is.
func TestRetryGuards(t *testing.T) {
	readOnly := &pgconn.PgError{Code: "25006"}
	cases := []struct {
		name       string
		err        error
		inTx       bool
		idempotent bool
		policy     RetryPolicy
		rejectRO   bool
		retry      bool
		bad        bool // the conn is marked bad
		invalidate bool // the pool generation moves
	}{
		{name: "nothing sent", err: notSentError{}, retry: true},
		{name: "driver says ErrBadConn", err: driver.ErrBadConn, retry: true, bad: true},
		{name: "read-only outside a tx, rejecting", err: readOnly, rejectRO: true, retry: true, bad: true, invalidate: true},
		{name: "mysql read-only outside a tx, rejecting", err: &mysql.MySQLError{Number: 1290}, rejectRO: true, retry: true, bad: true, invalidate: true},
		{name: "read-only inside a tx: the tx's earlier statements ran", err: readOnly, inTx: true, rejectRO: true, bad: true, invalidate: true},
		{name: "read-only, not rejecting: an ordinary error", err: readOnly},
		{name: "mid-flight loss: may have executed", err: io.ErrUnexpectedEOF, bad: true},
		{name: "mid-flight loss, idempotent", err: io.ErrUnexpectedEOF, idempotent: true, retry: true, bad: true},
		{name: "mid-flight loss, idempotent, in a tx", err: io.ErrUnexpectedEOF, idempotent: true, inTx: true, bad: true},
		{name: "session killed, idempotent", err: &pgconn.PgError{Code: "57P01"}, idempotent: true, retry: true, bad: true},
		{name: "crash: pool invalidated, not retried", err: &pgconn.PgError{Code: "57P02"}, bad: true, invalidate: true},
		{name: "mysql invalid connection: sent, then lost", err: mysql.ErrInvalidConn, bad: true},
		{name: "constraint violation", err: &pgconn.PgError{Code: "23505"}},
		{name: "constraint violation, idempotent", err: &pgconn.PgError{Code: "23505"}, idempotent: true},
		{name: "caller canceled", err: context.Canceled, idempotent: true},
		{name: "retry off: read-only", err: readOnly, rejectRO: true, policy: RetryOff, bad: true, invalidate: true},
		{name: "retry off: idempotent loss", err: io.EOF, idempotent: true, policy: RetryOff, bad: true},
		{name: "retry off: nothing sent", err: notSentError{}, policy: RetryOff},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.Retry = tc.policy }))
			c.rejectReadOnly = tc.rejectRO
			w, _ := connect(c, f)
			ctx := context.Background()
			if tc.idempotent {
				ctx = WithIdempotent(ctx)
			}
			gen := c.gen.Load()
			err := w.handleErr(ctx, wrap(tc.err), tc.inTx)
			if got := errors.Is(err, driver.ErrBadConn); got != tc.retry {
				t.Errorf("retry = %v, want %v (err %v)", got, tc.retry, err)
			}
			if !errors.Is(err, tc.err) {
				t.Errorf("the original error is lost: %v", err)
			}
			if got := w.bad.Load(); got != tc.bad {
				t.Errorf("marked bad = %v, want %v", got, tc.bad)
			}
			if got := c.gen.Load() != gen; got != tc.invalidate {
				t.Errorf("pool invalidated = %v, want %v", got, tc.invalidate)
			}
		})
	}
}

// TestReadOnlyFailoverThroughDatabaseSQL: a write rejected by a demoted
// primary runs again on a new connection (the old ones are retired), and
// the rejected attempt never executed.
func TestReadOnlyFailoverThroughDatabaseSQL(t *testing.T) {
	c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.RejectReadOnly = ReadOnlyReject }))
	c.rejectReadOnly = true
	f.onNew = func(fc *fakeConn) {
		if fc.id < 3 { // the first three conns point at the old primary
			fc.execErr = &pgconn.PgError{Code: "25006", Message: "cannot execute INSERT in a read-only transaction"}
		}
	}
	db := sql.OpenDB(c)
	defer db.Close()
	db.SetMaxIdleConns(5)
	ctx := context.Background()
	holdAndRelease(t, db, 3)
	if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatalf("write after failover: %v", err)
	}
	// One rejected attempt retired the pool; the retry skipped the other old
	// conns at checkout (no statement sent to them) and ran on conn 3.
	var rejected int64
	for i := range 3 {
		rejected += f.conn(i).execs.Load()
	}
	if rejected != 1 || f.conn(3).execs.Load() != 1 {
		t.Errorf("rejected attempts %d, executions on the new conn %d: want 1 and 1", rejected, f.conn(3).execs.Load())
	}
	if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (2)"); err != nil {
		t.Fatalf("second write: %v", err)
	}
}

func TestWithIdempotent(t *testing.T) {
	if isIdempotent(context.Background()) {
		t.Fatal("a plain context is not idempotent")
	}
	if !isIdempotent(WithIdempotent(context.Background())) {
		t.Fatal("WithIdempotent lost")
	}
}
