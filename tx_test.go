package resilientpg

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

var (
	errSerial   = &pgconn.PgError{Code: "40001", Message: "could not serialize access"}
	errDeadlock = &pgconn.PgError{Code: "40P01", Message: "deadlock detected"}
	errUnique   = &pgconn.PgError{Code: "23505", Message: "duplicate key"}
	errAborted  = &pgconn.PgError{Code: "25P02", Message: "current transaction is aborted"}
	errMyDead   = &mysql.MySQLError{Number: 1213, Message: "Deadlock found when trying to get lock"}
	errMyWait   = &mysql.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded"}
	errBusiness = errors.New("insufficient funds")
)

// txRow is one row of RunTx's decision table: what the first connection
// does, and what RunTx must make of it. Connections after the first
// succeed, so a retried transaction commits on its second attempt.
type txRow struct {
	name     string
	shape    fakeShape
	first    func(*fakeConn)
	stmts    int // statements fn runs; it returns the first error
	opts     []TxOption
	readOnly bool

	attempts  int64 // attempts RunTx made
	is        error // the final error must match it (nil: success)
	cause     TxRetryCause
	committed bool // the failed first attempt sent COMMIT
	// rollbacks is how many ROLLBACKs reached the fakes in all: one for
	// every attempt that failed after BEGIN and before COMMIT (fn's error,
	// or the guard's Commit of a transaction the server ended), none for
	// a failed BEGIN (no transaction) or a failed COMMIT (it ended the
	// transaction; database/sql allows nothing after Commit).
	rollbacks int64
}

// connClosedError is pgconn's "conn closed": nothing sent, on a connection
// pgx closed after an earlier failure.
type connClosedError struct{}

func (connClosedError) Error() string     { return "conn closed" }
func (connClosedError) SafeToRetry() bool { return true }
func (connClosedError) Unwrap() error     { return pgconn.ErrConnClosed }

var txTable = []txRow{
	{name: "commits", first: func(*fakeConn) {}, attempts: 1},
	{name: "BEGIN on a lost connection", first: func(c *fakeConn) { c.beginErr = io.ErrUnexpectedEOF },
		attempts: 2, cause: TxRetryConnLost},
	{name: "BEGIN on a connection pgx closed", first: func(c *fakeConn) { c.beginErr = connClosedError{} },
		attempts: 2, cause: TxRetryConnLost},
	{name: "serialization failure", first: func(c *fakeConn) { c.txExecErrs = []error{errSerial} },
		attempts: 2, cause: TxRetrySerialization, rollbacks: 1},
	{name: "deadlock", first: func(c *fakeConn) { c.txExecErrs = []error{errDeadlock} },
		attempts: 2, cause: TxRetryDeadlock, rollbacks: 1},
	{name: "mysql deadlock, then a statement the guard refuses", shape: shapeMySQL, stmts: 2,
		first: func(c *fakeConn) { c.txExecErrs = []error{nil, errMyDead} }, attempts: 2, cause: TxRetryDeadlock, rollbacks: 1},
	{name: "mysql lock wait timeout", shape: shapeMySQL, first: func(c *fakeConn) { c.txExecErrs = []error{errMyWait} },
		attempts: 2, cause: TxRetrySerialization, rollbacks: 1},
	{name: "unique violation: the caller's error", first: func(c *fakeConn) { c.txExecErrs = []error{errUnique} },
		attempts: 1, is: errUnique, rollbacks: 1},
	{name: "unique violation, opted in", first: func(c *fakeConn) { c.txExecErrs = []error{errUnique} },
		opts: []TxOption{TxRetryUniqueViolation()}, attempts: 2, cause: TxRetryUnique, rollbacks: 1},
	{name: "extra code", first: func(c *fakeConn) { c.txExecErrs = []error{&pgconn.PgError{Code: "55P03"}} },
		opts: []TxOption{TxRetryOn("55P03")}, attempts: 2, cause: TxRetryExtra, rollbacks: 1},
	{name: "connection lost inside fn", first: func(c *fakeConn) { c.txExecErrs = []error{io.ErrUnexpectedEOF} },
		attempts: 2, cause: TxRetryConnLost, rollbacks: 1},
	{name: "connection lost during COMMIT: unknown", first: func(c *fakeConn) { c.commitErr = io.ErrUnexpectedEOF },
		attempts: 1, is: ErrCommitUnknown, committed: true},
	{name: "connection lost during a read-only COMMIT", first: func(c *fakeConn) { c.commitErr = io.ErrUnexpectedEOF },
		readOnly: true, attempts: 2, cause: TxRetryConnLost, committed: true},
	{name: "serialization failure at COMMIT", first: func(c *fakeConn) { c.commitErr = errSerial },
		attempts: 2, cause: TxRetrySerialization, committed: true},
	{name: "COMMIT answered ROLLBACK after a swallowed serialization failure", stmts: -1,
		first:    func(c *fakeConn) { c.txExecErrs = []error{errSerial}; c.commitErr = pgx.ErrTxCommitRollback },
		attempts: 2, cause: TxRetrySerialization, committed: true},
	{name: "COMMIT answered ROLLBACK after a swallowed constraint error", stmts: -1,
		first:    func(c *fakeConn) { c.txExecErrs = []error{errUnique}; c.commitErr = pgx.ErrTxCommitRollback },
		attempts: 1, is: ErrTxAborted, committed: true},
	{name: "25P02 after a swallowed serialization failure", stmts: -2,
		first: func(c *fakeConn) { c.txExecErrs = []error{errSerial, errAborted} }, attempts: 2, cause: TxRetrySerialization,
		rollbacks: 1},
	// Rows added for issue 9's table: BEGIN reset by the peer, deadlocks
	// reported by COMMIT on both engines.
	{name: "BEGIN on a reset connection", first: func(c *fakeConn) { c.beginErr = syscall.ECONNRESET },
		attempts: 2, cause: TxRetryConnLost},
	{name: "deadlock at COMMIT", first: func(c *fakeConn) { c.commitErr = errDeadlock },
		attempts: 2, cause: TxRetryDeadlock, committed: true},
	{name: "mysql deadlock at COMMIT", shape: shapeMySQL, first: func(c *fakeConn) { c.commitErr = errMyDead },
		attempts: 2, cause: TxRetryDeadlock, committed: true},
	{name: "mysql lock wait timeout at COMMIT", shape: shapeMySQL, first: func(c *fakeConn) { c.commitErr = errMyWait },
		attempts: 2, cause: TxRetrySerialization, committed: true},
	{name: "the caller's own error", stmts: -3, first: func(*fakeConn) {}, attempts: 1, is: errBusiness, rollbacks: 1},
}

// runTxRow runs one row; fn runs n statements and returns the first error
// (n < 0: it swallows errors; -2: two statements; -3: returns errBusiness).
func runTxRow(t *testing.T, row txRow) (*Connector, *fakeConnector, error) {
	t.Helper()
	c, f := newFakeConnector(row.shape, opts(nil))
	f.onNew = func(fc *fakeConn) {
		if fc.id == 0 {
			row.first(fc)
		}
	}
	db := sql.OpenDB(c)
	t.Cleanup(func() { db.Close() })
	n, swallow := row.stmts, false
	switch {
	case n == 0:
		n = 1
	case n == -3:
		n = 0
	case n < 0:
		n, swallow = -n, true
	}
	fn := func(ctx context.Context, tx *sql.Tx) error {
		for range n {
			if _, err := tx.ExecContext(ctx, "UPDATE t SET v = v + 1"); err != nil && !swallow {
				return err
			}
		}
		if row.stmts == -3 {
			return errBusiness
		}
		return nil
	}
	err := RunTx(context.Background(), db, &sql.TxOptions{ReadOnly: row.readOnly}, fn,
		append([]TxOption{TxBackoff(time.Millisecond, time.Millisecond)}, row.opts...)...)
	return c, f, err
}

func TestRunTxDecisionTable(t *testing.T) {
	for _, row := range txTable {
		t.Run(row.name, func(t *testing.T) {
			c, f, err := runTxRow(t, row)
			switch {
			case row.is == nil && err != nil:
				t.Fatalf("RunTx: %v, want success", err)
			case row.is != nil && !errors.Is(err, row.is):
				t.Fatalf("RunTx: %v, want an error matching %v", err, row.is)
			}
			s := c.Stats()
			if s.TxAttempts != row.attempts {
				t.Errorf("%d attempts, want %d (err %v)", s.TxAttempts, row.attempts, err)
			}
			if row.attempts > 1 && (s.TxRetries[row.cause] != row.attempts-1 || s.TxRetries.Total() != row.attempts-1) {
				t.Errorf("retries %v, want %d under %v", s.TxRetries, row.attempts-1, row.cause)
			}
			var commits, auto, rollbacks int64
			for i := range int(f.opens.Load()) {
				commits += f.conn(i).commits.Load()
				auto += f.conn(i).autoExecs.Load()
				rollbacks += f.conn(i).rollbacks.Load()
			}
			want := int64(0)
			if row.committed {
				want++ // the failed attempt's
			}
			if row.is == nil {
				want++ // the one that succeeded
			}
			if commits != want {
				t.Errorf("%d COMMITs sent, want %d", commits, want)
			}
			if auto != 0 {
				t.Errorf("%d statements ran outside a transaction", auto)
			}
			if rollbacks != row.rollbacks {
				t.Errorf("%d ROLLBACKs sent, want %d (one per attempt that failed between BEGIN and COMMIT)", rollbacks, row.rollbacks)
			}
			if errors.Is(err, ErrCommitUnknown) && s.TxCommitUnknown != 1 {
				t.Errorf("TxCommitUnknown = %d, want 1", s.TxCommitUnknown)
			}
		})
	}
}

// TestTxGuardMariaDBDeadlock is the MariaDB report with plain BeginTx: after
// the deadlock the next statement fails with ErrTxAborted without reaching
// the server, Commit returns it too (never nil), Rollback returns nil.
func TestTxGuardMariaDBDeadlock(t *testing.T) {
	c, f := newFakeConnector(shapeMySQL, opts(nil))
	f.onNew = func(fc *fakeConn) { fc.txExecErrs = []error{errMyDead} }
	db := sql.OpenDB(c)
	defer db.Close()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "UPDATE a"); !errors.Is(err, ErrTxAborted) || !isMySQLDeadlock(err) {
		t.Fatalf("the deadlocked statement: %v, want ErrTxAborted around 1213", err)
	}
	_, err = tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
	if !errors.Is(err, ErrTxAborted) || !isMySQLDeadlock(err) {
		t.Fatalf("the statement after the deadlock: %v, want ErrTxAborted around 1213", err)
	}
	if fc := f.conn(0); fc.inTxExecs.Load() != 1 || fc.autoExecs.Load() != 0 {
		t.Errorf("statements sent: %d in the transaction, %d in autocommit; want 1 and 0", fc.inTxExecs.Load(), fc.autoExecs.Load())
	}
	if err := tx.Commit(); !errors.Is(err, ErrTxAborted) {
		t.Fatalf("Commit: %v, want ErrTxAborted", err)
	}
	if f.conn(0).commits.Load() != 0 {
		t.Error("COMMIT was sent for a transaction the server ended")
	}
	if s := c.Stats(); s.TxRefused != 2 {
		t.Errorf("TxRefused = %d, want 2 (a statement and the Commit)", s.TxRefused)
	}

	tx, _ = db.BeginTx(ctx, nil)
	tx.ExecContext(ctx, "UPDATE a") // the deadlock again, on a fresh transaction
	if err := tx.Rollback(); err != nil {
		t.Errorf("Rollback after the server ended the transaction: %v, want nil", err)
	}
}

// TestTxGuardCommitOnClosedSocket: a connection the server closed is found
// by the socket check before COMMIT is sent: ErrTxAborted, and RunTx runs
// the transaction again on another connection.
func TestTxGuardCommitOnClosedSocket(t *testing.T) {
	c, f := newFakeConnector(shapePgx, opts(nil))
	db := sql.OpenDB(c)
	defer db.Close()
	ctx := context.Background()
	attempt := 0
	err := RunTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		attempt++
		if _, err := tx.ExecContext(ctx, "UPDATE t"); err != nil {
			return err
		}
		if attempt == 1 {
			// The server goes away after the last statement, before COMMIT.
			client, server := tcpPair(t)
			w := activeTxConn(c)
			w.sock = newSockCheck(client)
			server.Close()
			waitState(w.sock, sockClosed)
		}
		return nil
	}, TxBackoff(time.Millisecond, time.Millisecond))
	if err != nil {
		t.Fatalf("RunTx: %v", err)
	}
	if f.conn(0).commits.Load() != 0 || attempt != 2 {
		t.Errorf("COMMITs sent on the dead connection %d, attempts %d; want 0 and 2", f.conn(0).commits.Load(), attempt)
	}
	if s := c.Stats(); s.TxRetries[TxRetryConnLost] != 1 {
		t.Errorf("retries %v, want one conn_lost", s.TxRetries)
	}
}

// TestRunTxGivesUp: the final error says how many attempts were made and
// wraps the last cause, when they run out and when the caller's context
// ends between attempts or during the wait.
func TestRunTxGivesUp(t *testing.T) {
	always := func(context.Context, *sql.Tx) error { return errSerial }
	t.Run("attempts exhausted", func(t *testing.T) {
		c, _ := newFakeConnector(shapePgx, opts(nil))
		db := sql.OpenDB(c)
		defer db.Close()
		err := RunTx(context.Background(), db, nil, always, TxAttempts(3), TxBackoff(time.Millisecond, time.Millisecond))
		if !errors.Is(err, errSerial) || !strings.Contains(err.Error(), "after 3 attempts") {
			t.Fatalf("err %v, want the serialization failure after 3 attempts", err)
		}
		if s := c.Stats(); s.TxAttempts != 3 || s.TxRetries[TxRetrySerialization] != 2 {
			t.Errorf("attempts %d, retries %v; want 3 and 2", s.TxAttempts, s.TxRetries)
		}
	})
	t.Run("deadline during the wait", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c, _ := newFakeConnector(shapePgx, opts(nil))
			db := sql.OpenDB(c)
			defer db.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			start := time.Now()
			err := RunTx(ctx, db, nil, always, TxBackoff(time.Second, time.Second))
			if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, errSerial) || !strings.Contains(err.Error(), "attempts") {
				t.Fatalf("err %v, want the deadline and the last cause", err)
			}
			if time.Since(start) > 50*time.Millisecond {
				t.Errorf("RunTx returned %v after its deadline", time.Since(start)-50*time.Millisecond)
			}
		})
	})
	t.Run("context canceled inside fn", func(t *testing.T) {
		c, _ := newFakeConnector(shapePgx, opts(nil))
		db := sql.OpenDB(c)
		defer db.Close()
		ctx, cancel := context.WithCancel(context.Background())
		err := RunTx(ctx, db, nil, func(context.Context, *sql.Tx) error { cancel(); return errSerial })
		if !errors.Is(err, context.Canceled) || c.Stats().TxAttempts != 1 {
			t.Fatalf("err %v after %d attempts, want the cancellation after 1", err, c.Stats().TxAttempts)
		}
	})
}

// activeTxConn returns the connection whose transaction is open; only the
// goroutine running that transaction may call it.
func activeTxConn(c *Connector) *conn {
	c.track.mu.Lock()
	defer c.track.mu.Unlock()
	for w := range c.track.conns {
		if w.tx.active {
			return w
		}
	}
	return nil
}
