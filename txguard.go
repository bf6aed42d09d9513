package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrTxAborted is matched (errors.Is) by the error of a statement or a
// Commit on a transaction the server has already ended: a MySQL/MariaDB
// deadlock, which rolls the whole transaction back; a lost connection on
// either engine; PostgreSQL's "current transaction is aborted" (25P02).
// Nothing more of the transaction can run: roll it back and run it again
// from its start. The error that ended it stays in the chain.
var ErrTxAborted = errors.New("resilientpg: transaction already ended by the server; roll back and run it again from the start")

// ErrCommitUnknown is matched by the error of a Commit whose connection was
// lost while COMMIT was in flight: the transaction may or may not have
// committed, and only reading the data can tell. The connection is
// discarded. The driver's error stays in the chain.
var ErrCommitUnknown = errors.New("resilientpg: connection lost while COMMIT was in flight; the transaction may or may not have committed")

// txError is ErrTxAborted or ErrCommitUnknown with what caused it: err is
// the error of the statement or Commit that met it, cause the error that
// ended the transaction, if that came earlier.
type txError struct {
	kind  error // ErrTxAborted or ErrCommitUnknown
	err   error
	cause error
}

func (e *txError) Error() string {
	msg := e.kind.Error()
	if e.cause != nil && e.cause != e.err {
		msg += " (ended by: " + e.cause.Error() + ")"
	}
	if e.err != nil {
		msg += ": " + e.err.Error()
	}
	return msg
}

func (e *txError) Is(target error) bool { return target == e.kind }

func (e *txError) Unwrap() []error {
	out := make([]error, 0, 2)
	if e.err != nil {
		out = append(out, e.err)
	}
	if e.cause != nil && e.cause != e.err {
		out = append(out, e.cause)
	}
	return out
}

// tx is the transaction guard. It reverses the rule that Stmt, Rows and Tx
// are returned untouched, for a correctness reason: once the server has
// ended a transaction on its own (MariaDB rolls it back on a deadlock and
// runs the next statement in autocommit; a lost connection ends it on any
// engine), a statement sent on the same *sql.Tx would commit on its own,
// and a Commit that returned nil would claim work that was rolled back.
// The guard refuses both. It lives inside the conn (one transaction at a
// time per connection), so beginning one allocates nothing.
type tx struct {
	inner  driver.Tx
	c      *conn
	active bool  // between BeginTx and Commit/Rollback; guarded by the driverConn lock
	ended  error // what ended the transaction server-side; nil while it is alive
	first  error // the first failed statement (PostgreSQL aborts the transaction on it)
}

var _ driver.Tx = (*tx)(nil)

// begin arms the guard for a new transaction.
func (c *conn) begin(inner driver.Tx) driver.Tx {
	c.txOpen = true
	c.txFlag.Store(true)
	c.tx = tx{inner: inner, c: c, active: true}
	return &c.tx
}

// refuse returns the error of a statement on a transaction that has ended,
// or nil; it sends nothing.
func (c *conn) refuseInTx() error {
	if !c.tx.active || c.tx.ended == nil {
		return nil
	}
	c.c.stats.txRefused.Add(1)
	return &txError{kind: ErrTxAborted, cause: c.tx.ended}
}

// noteTxFailure records a statement of the transaction that failed with
// err, and returns what to give the caller instead of ret (the error
// handleErr made of err): ErrTxAborted when the failure ended the
// transaction.
func (c *conn) noteTxFailure(err, ret error) error {
	t := &c.tx
	if t.first == nil {
		t.first = err
	}
	switch {
	case IsDisconnect(err) || errors.Is(err, driver.ErrBadConn):
		t.ended = err // the session, and the transaction with it, are gone
	case isMySQLDeadlock(err):
		t.ended = err // InnoDB rolled the whole transaction back
	case isPgAborted(err):
		// The server refused: an earlier failure aborted the transaction.
		t.ended = t.first
		return &txError{kind: ErrTxAborted, err: ret, cause: t.first}
	default:
		return ret
	}
	return &txError{kind: ErrTxAborted, err: ret}
}

// Commit refuses a transaction the server has ended and, before sending
// COMMIT, peeks at the socket: a connection the server has closed cannot
// commit, and that is known for certain only before COMMIT is sent.
// Afterwards, a lost connection makes the outcome unknown.
func (t *tx) Commit() error {
	c := t.c
	defer c.endTx()
	if t.ended != nil {
		_ = t.inner.Rollback() // MariaDB: the server may still think a transaction is open
		c.c.stats.txRefused.Add(1)
		return &txError{kind: ErrTxAborted, cause: t.ended}
	}
	if c.sock != nil {
		if st := c.sock.check(); st == sockClosed || st == sockFatal || st == sockDeadPath {
			c.bad.Store(true)
			c.deadPath.Store(st == sockDeadPath)
			_ = t.inner.Rollback()
			c.c.stats.txRefused.Add(1)
			return &txError{kind: ErrTxAborted, cause: ErrServerClosed}
		}
	}
	err := t.inner.Commit()
	if err == nil {
		return nil
	}
	class := Classify(err)
	switch {
	case errors.Is(err, pgx.ErrTxCommitRollback):
		// The server answered ROLLBACK: an earlier failure aborted it.
		return &txError{kind: ErrTxAborted, err: err, cause: t.first}
	case class == ClassSerialization:
		return &txError{kind: ErrTxAborted, err: err} // 40001 at COMMIT: rolled back
	case pgconn.SafeToRetry(err):
		c.bad.Store(true)
		return &txError{kind: ErrTxAborted, err: err} // COMMIT was never sent
	case IsDisconnect(err) || errors.Is(err, driver.ErrBadConn):
		c.bad.Store(true)
		c.c.stats.commitUnknown.Add(1)
		return &txError{kind: ErrCommitUnknown, err: err}
	}
	return err
}

// Rollback returns nil for a transaction the server has already ended:
// there is nothing left to roll back.
func (t *tx) Rollback() error {
	c := t.c
	defer c.endTx()
	err := t.inner.Rollback()
	if t.ended != nil || (err != nil && IsDisconnect(err)) {
		if err != nil {
			c.bad.Store(true)
		}
		return nil
	}
	return err
}

func (c *conn) endTx() {
	c.tx = tx{}
	c.txOpen = false
	c.txFlag.Store(false)
}

func isMySQLDeadlock(err error) bool {
	n, ok := asMySQLNumber(err)
	return ok && n == 1213
}

func isPgAborted(err error) bool {
	code, ok := asPgError(err)
	return ok && code == "25P02" // in_failed_sql_transaction
}

// beginFallback is what database/sql's ctxDriverBegin does for a driver
// without ConnBeginTx.
func (c *conn) beginFallback(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if opts.Isolation != driver.IsolationLevel(0) {
		return nil, errors.New("sql: driver does not support non-default isolation level")
	}
	if opts.ReadOnly {
		return nil, errors.New("sql: driver does not support read-only transactions")
	}
	t, err := c.Begin()
	if err == nil && ctx.Done() != nil {
		select {
		default:
		case <-ctx.Done():
			t.Rollback()
			return nil, ctx.Err()
		}
	}
	return t, err
}
