package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
)

// Unit tests of the transaction guard on a plain *sql.Tx (db.BeginTx, not
// RunTx), and of the rows of RunTx's decision table that need more than a
// row of txTable: a refused connect at BEGIN, the order of ROLLBACK and
// the next attempt, the discard of a connection whose COMMIT was lost.

// sentCounts is what reached a fake connection: statements (in a
// transaction and outside it), queries, prepares, COMMITs and ROLLBACKs.
type sentCounts struct {
	inTx, auto, queries, prepares, stmtExecs, commits, rollbacks int64
}

func sent(fc *fakeConn) sentCounts {
	return sentCounts{
		inTx: fc.inTxExecs.Load(), auto: fc.autoExecs.Load(),
		queries: fc.queries.Load(), prepares: fc.prepares.Load(),
		// fakeStmt.Exec counts in execs without going through inTx/auto.
		stmtExecs: fc.execs.Load() - fc.inTxExecs.Load() - fc.autoExecs.Load(),
		commits:   fc.commits.Load(), rollbacks: fc.rollbacks.Load(),
	}
}

// TestTxGuardDisconnectPlainTx: a statement of a plain *sql.Tx loses its
// connection. From then on every statement on that *sql.Tx (Exec, Query,
// QueryRow, Prepare, and a statement prepared before the loss) fails at
// once with ErrTxAborted and reaches the inner driver not at all; Commit
// returns ErrTxAborted and sends no COMMIT; Rollback returns nil, though
// the driver's own ROLLBACK on the dead connection fails. The
// driver's io.ErrUnexpectedEOF stays in every chain, and the connection is
// not used again.
func TestTxGuardDisconnectPlainTx(t *testing.T) {
	for _, shape := range []fakeShape{shapePgx, shapeMySQL} {
		for _, end := range []string{"Commit", "Rollback"} {
			t.Run(shape.String()+"/"+end, func(t *testing.T) {
				c, f := newFakeConnector(shape, opts(nil))
				f.onNew = func(fc *fakeConn) {
					if fc.id == 0 {
						fc.txExecErrs = []error{nil, io.ErrUnexpectedEOF} // the second statement loses the connection
						// ROLLBACK on the dead connection fails, as the drivers' do.
						fc.rollbackErr = connClosedError{}
						if shape == shapeMySQL {
							fc.rollbackErr = mysql.ErrInvalidConn
						}
					}
				}
				db := sql.OpenDB(c)
				defer db.Close()
				ctx := context.Background()
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer tx.Rollback()
				if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
					t.Fatalf("first statement: %v", err)
				}
				st, err := tx.PrepareContext(ctx, "INSERT INTO t VALUES (4)") // prepared while the connection lives
				if err != nil {
					t.Fatalf("prepare: %v", err)
				}
				_, lost := tx.ExecContext(ctx, "INSERT INTO t VALUES (2)")
				if !IsDisconnect(lost) || !errors.Is(lost, io.ErrUnexpectedEOF) {
					t.Fatalf("the statement that lost the connection: %v, want a disconnect around io.ErrUnexpectedEOF", lost)
				}
				if !errors.Is(lost, ErrTxAborted) {
					t.Errorf("the statement that lost the connection: %v, want ErrTxAborted (the transaction is gone with the session)", lost)
				}
				var se *StatementError
				if !errors.As(lost, &se) || se.Reason.Retried() {
					t.Errorf("the statement that lost the connection: %v, want a StatementError that was not retried", lost)
				}
				fc := f.conn(0)
				before := sent(fc)
				refusedBefore := c.Stats().TxRefused

				// Every later statement is refused without reaching the driver.
				later := map[string]error{}
				_, later["Exec"] = tx.ExecContext(ctx, "INSERT INTO t VALUES (3)")
				rows, qerr := tx.QueryContext(ctx, "SELECT 1")
				if rows != nil {
					rows.Close()
				}
				later["Query"] = qerr
				var v int64
				later["QueryRow"] = tx.QueryRowContext(ctx, "SELECT 1").Scan(&v)
				_, later["Prepare"] = tx.PrepareContext(ctx, "INSERT INTO t VALUES (5)")
				_, later["prepared Exec"] = st.ExecContext(ctx)
				for what, err := range later {
					if !errors.Is(err, ErrTxAborted) || !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Errorf("%s after the loss: %v, want ErrTxAborted with io.ErrUnexpectedEOF in the chain", what, err)
					}
				}
				if after := sent(fc); after != before {
					t.Errorf("after the loss the driver saw %+v, before %+v: a refused statement reached it", after, before)
				}
				if got := c.Stats().TxRefused - refusedBefore; got != int64(len(later)) {
					t.Errorf("TxRefused grew by %d, want %d", got, len(later))
				}

				switch end {
				case "Commit":
					err := tx.Commit()
					if err == nil || !errors.Is(err, ErrTxAborted) || !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Fatalf("Commit: %v, want ErrTxAborted with io.ErrUnexpectedEOF in the chain", err)
					}
					if errors.Is(err, ErrCommitUnknown) {
						t.Errorf("Commit: %v: no COMMIT was sent, so its outcome is not unknown", err)
					}
					if n := fc.commits.Load(); n != 0 {
						t.Errorf("%d COMMITs sent on a transaction whose connection was lost", n)
					}
				case "Rollback":
					if err := tx.Rollback(); err != nil {
						t.Fatalf("Rollback: %v, want nil", err)
					}
				}
				if n := fc.autoExecs.Load(); n != 0 {
					t.Errorf("%d statements ran in autocommit", n)
				}
				// The lost connection is not handed out again.
				if err := db.QueryRowContext(ctx, "SELECT id").Scan(&v); err != nil {
					t.Fatalf("query after the transaction: %v", err)
				}
				if v == 0 || !fc.closed.Load() {
					t.Errorf("the next query ran on fake conn %d; conn 0 closed: %v; want a new conn and conn 0 closed", v, fc.closed.Load())
				}
			})
		}
	}
}

// TestTxGuardPg25P02PlainTx: PostgreSQL refuses every statement after a
// failure in a transaction with 25P02. On a plain *sql.Tx that error
// matches ErrTxAborted, keeps the *pgconn.PgError in the chain (errors.As)
// and the failure that aborted the transaction too; later statements and
// Commit are refused without being sent; Rollback returns nil.
func TestTxGuardPg25P02PlainTx(t *testing.T) {
	for _, end := range []string{"Commit", "Rollback"} {
		t.Run(end, func(t *testing.T) {
			c, f := newFakeConnector(shapePgx, opts(nil))
			f.onNew = func(fc *fakeConn) {
				if fc.id == 0 {
					fc.txExecErrs = []error{nil, errUnique, errAborted}
				}
			}
			db := sql.OpenDB(c)
			defer db.Close()
			ctx := context.Background()
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
				t.Fatalf("first statement: %v", err)
			}
			_, first := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)") // the earlier failure; the caller ignores it
			if !errors.Is(first, errUnique) {
				t.Fatalf("the failing statement: %v, want the unique violation", first)
			}
			_, aborted := tx.ExecContext(ctx, "INSERT INTO t VALUES (2)")
			if !errors.Is(aborted, ErrTxAborted) {
				t.Errorf("25P02: %v, want ErrTxAborted", aborted)
			}
			var pe *pgconn.PgError
			if !errors.As(aborted, &pe) || pe.Code != "25P02" {
				t.Errorf("25P02: %v: errors.As found %v, want the *pgconn.PgError 25P02", aborted, pe)
			}
			if !errors.Is(aborted, errUnique) {
				t.Errorf("25P02: %v, want the failure that aborted the transaction (23505) in the chain", aborted)
			}
			fc := f.conn(0)
			before := sent(fc)
			_, again := tx.ExecContext(ctx, "INSERT INTO t VALUES (3)")
			if !errors.Is(again, ErrTxAborted) || !errors.Is(again, errUnique) {
				t.Errorf("a statement after 25P02: %v, want ErrTxAborted around the 23505", again)
			}
			if after := sent(fc); after != before {
				t.Errorf("a statement after 25P02 reached the driver: %+v, before %+v", after, before)
			}
			switch end {
			case "Commit":
				if err := tx.Commit(); !errors.Is(err, ErrTxAborted) {
					t.Fatalf("Commit: %v, want ErrTxAborted", err)
				}
				if n := fc.commits.Load(); n != 0 {
					t.Errorf("%d COMMITs sent for an aborted transaction", n)
				}
			case "Rollback":
				if err := tx.Rollback(); err != nil {
					t.Fatalf("Rollback: %v, want nil", err)
				}
			}
			if n := fc.rollbacks.Load(); n != 1 {
				t.Errorf("%d ROLLBACKs sent, want 1 (the server still holds the aborted transaction)", n)
			}
		})
	}
}

// TestTxCommitUnknownDiscardsConn: after ErrCommitUnknown, through RunTx
// and through a plain *sql.Tx, the connection is discarded: closed, refused
// at return as marked bad, and the next query runs on a new one.
func TestTxCommitUnknownDiscardsConn(t *testing.T) {
	for _, shape := range []fakeShape{shapePgx, shapeMySQL} {
		for _, via := range []string{"RunTx", "BeginTx"} {
			t.Run(shape.String()+"/"+via, func(t *testing.T) {
				c, f := newFakeConnector(shape, opts(nil))
				f.onNew = func(fc *fakeConn) {
					if fc.id == 0 {
						fc.commitErr = io.ErrUnexpectedEOF
					}
				}
				db := sql.OpenDB(c)
				defer db.Close()
				db.SetMaxIdleConns(4)
				ctx := context.Background()
				write := func(ctx context.Context, tx *sql.Tx) error {
					_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
					return err
				}
				var err error
				if via == "RunTx" {
					err = RunTx(ctx, db, nil, write, TxBackoff(time.Millisecond, time.Millisecond))
				} else {
					tx, berr := db.BeginTx(ctx, nil)
					if berr != nil {
						t.Fatal(berr)
					}
					if err := write(ctx, tx); err != nil {
						t.Fatal(err)
					}
					err = tx.Commit()
				}
				if !errors.Is(err, ErrCommitUnknown) || !errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, ErrTxAborted) {
					t.Fatalf("err %v, want ErrCommitUnknown (not ErrTxAborted) around io.ErrUnexpectedEOF", err)
				}
				fc := f.conn(0)
				if fc.commits.Load() != 1 {
					t.Fatalf("%d COMMITs sent, want 1", fc.commits.Load())
				}
				s := c.Stats()
				if s.TxCommitUnknown != 1 {
					t.Errorf("TxCommitUnknown = %d, want 1", s.TxCommitUnknown)
				}
				if !fc.closed.Load() {
					t.Error("the connection whose COMMIT was lost is still open")
				}
				if n := s.ReturnsRejected[DiscardMarkedBad] + s.Discards[DiscardMarkedBad]; n != 1 {
					t.Errorf("discarded as marked bad %d times (returns rejected %v, checkout discards %v), want 1",
						n, s.ReturnsRejected, s.Discards)
				}
				var id int64
				if err := db.QueryRowContext(ctx, "SELECT id").Scan(&id); err != nil {
					t.Fatal(err)
				}
				if id == 0 || fc.queries.Load() != 0 {
					t.Errorf("the next query ran on fake conn %d (conn 0 saw %d queries), want a new connection", id, fc.queries.Load())
				}
				if f.opens.Load() != 2 {
					t.Errorf("%d connections opened, want 2", f.opens.Load())
				}
			})
		}
	}
}

// TestRunTxLockWaitTimeoutRollsBackFirst: MySQL's 1205 rolls back only the
// statement (innodb_rollback_on_timeout is off by default), so the
// transaction stays open on the server: RunTx must send ROLLBACK before it
// runs the transaction again. The second attempt finds that ROLLBACK
// already sent, on the same connection, which is then reused.
func TestRunTxLockWaitTimeoutRollsBackFirst(t *testing.T) {
	c, f := newFakeConnector(shapeMySQL, opts(nil))
	f.onNew = func(fc *fakeConn) {
		if fc.id == 0 {
			fc.txExecErrs = []error{nil, errMyWait}
		}
	}
	db := sql.OpenDB(c)
	defer db.Close()
	attempt := 0
	var seen []sentCounts // what conn 0 had received when each attempt began
	err := RunTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		attempt++
		seen = append(seen, sent(f.conn(0)))
		for _, q := range []string{"UPDATE a SET n = 1", "UPDATE b SET n = 1"} {
			if _, err := tx.ExecContext(ctx, q); err != nil {
				return err
			}
		}
		return nil
	}, TxBackoff(time.Millisecond, time.Millisecond))
	if err != nil {
		t.Fatalf("RunTx: %v", err)
	}
	if attempt != 2 || len(seen) != 2 {
		t.Fatalf("%d attempts, want 2", attempt)
	}
	if seen[1].rollbacks != 1 || seen[1].commits != 0 {
		t.Errorf("when the second attempt began, conn 0 had %d ROLLBACKs and %d COMMITs, want 1 and 0", seen[1].rollbacks, seen[1].commits)
	}
	fc := f.conn(0)
	if f.opens.Load() != 1 || fc.begins.Load() != 2 {
		t.Errorf("%d connections, %d BEGINs on conn 0; want 1 and 2 (1205 leaves the connection healthy)", f.opens.Load(), fc.begins.Load())
	}
	if fc.rollbacks.Load() != 1 || fc.commits.Load() != 1 || fc.autoExecs.Load() != 0 {
		t.Errorf("conn 0: %d ROLLBACKs, %d COMMITs, %d autocommit statements; want 1, 1, 0",
			fc.rollbacks.Load(), fc.commits.Load(), fc.autoExecs.Load())
	}
	if s := c.Stats(); s.TxRetries[TxRetrySerialization] != 1 || s.TxRetries.Total() != 1 {
		t.Errorf("retries %v, want one serialization", s.TxRetries)
	}
}

// TestRunTxRollsBackEveryFailedAttempt: a transaction that fails in fn on
// each of its attempts (a deadlock, a serialization failure, a lost
// connection, in turn, on both engines) is rolled back every time before
// the next attempt, and never committed.
func TestRunTxRollsBackEveryFailedAttempt(t *testing.T) {
	for _, shape := range []fakeShape{shapePgx, shapeMySQL} {
		t.Run(shape.String(), func(t *testing.T) {
			c, f := newFakeConnector(shape, opts(nil))
			db := sql.OpenDB(c)
			defer db.Close()
			causes := []error{errDeadlock, errSerial, io.ErrUnexpectedEOF, errMyDead, errMyWait}
			attempt := 0
			err := RunTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
				attempt++
				var total int64
				for i := range int(f.opens.Load()) {
					total += f.conn(i).rollbacks.Load()
				}
				if total != int64(attempt-1) {
					t.Errorf("attempt %d began after %d ROLLBACKs, want %d", attempt, total, attempt-1)
				}
				if _, err := tx.ExecContext(ctx, "UPDATE t SET n = n + 1"); err != nil {
					return err
				}
				if attempt <= len(causes) {
					return causes[attempt-1] // as if the statement had failed with it
				}
				return nil
			}, TxBackoff(time.Millisecond, time.Millisecond))
			if err != nil {
				t.Fatalf("RunTx: %v", err)
			}
			var rollbacks, commits int64
			for i := range int(f.opens.Load()) {
				rollbacks += f.conn(i).rollbacks.Load()
				commits += f.conn(i).commits.Load()
			}
			if attempt != len(causes)+1 || rollbacks != int64(len(causes)) || commits != 1 {
				t.Errorf("%d attempts, %d ROLLBACKs, %d COMMITs; want %d, %d, 1", attempt, rollbacks, commits, len(causes)+1, len(causes))
			}
		})
	}
}

// refusingConnector refuses its first connects as a server that is down
// does (ECONNREFUSED from the dial), then hands out fakes.
type refusingConnector struct {
	*fakeConnector
	refuse  atomic.Int64 // connects still to refuse
	refused atomic.Int64
}

func (r *refusingConnector) Connect(ctx context.Context) (driver.Conn, error) {
	if r.refuse.Add(-1) >= 0 {
		r.refused.Add(1)
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
	return r.fakeConnector.Connect(ctx)
}

// TestRunTxBeginRefused: BEGIN fails because no connection can be had
// (the server refuses connects; the wrapper's connect gate fails at once
// with resilient_connect_wait=0): nothing of the transaction ran, and RunTx
// runs the whole attempt again until a connection is had. fn runs once,
// on the connection that BEGIN finally got.
func TestRunTxBeginRefused(t *testing.T) {
	f := &refusingConnector{fakeConnector: &fakeConnector{shape: shapePgx}}
	f.refuse.Store(2)
	c, err := NewConnector(f, opts(func(o *Options) {
		o.ConnectWait = 0
		o.ProbeInterval = time.Millisecond
	}))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(c)
	defer db.Close()
	var fnRuns int
	err = RunTx(context.Background(), db, nil, func(ctx context.Context, tx *sql.Tx) error {
		fnRuns++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	}, TxAttempts(200), TxBackoff(time.Millisecond, 2*time.Millisecond))
	if err != nil {
		t.Fatalf("RunTx: %v", err)
	}
	s := c.Stats()
	t.Logf("%d connects refused; %d attempts, retries %v", f.refused.Load(), s.TxAttempts, s.TxRetries)
	if f.refused.Load() < 1 || s.TxAttempts < 2 {
		t.Fatalf("%d refusals, %d attempts: BEGIN never saw the refusal, so this test proved nothing", f.refused.Load(), s.TxAttempts)
	}
	if s.TxRetries[TxRetryConnLost] != s.TxAttempts-1 || s.TxRetries.Total() != s.TxAttempts-1 {
		t.Errorf("retries %v after %d attempts, want all %d under conn_lost", s.TxRetries, s.TxAttempts, s.TxAttempts-1)
	}
	if fnRuns != 1 {
		t.Errorf("fn ran %d times, want 1: no attempt before the connection got past BEGIN", fnRuns)
	}
	fc := f.conn(0)
	if f.opens.Load() != 1 || fc.begins.Load() != 1 || fc.commits.Load() != 1 || fc.rollbacks.Load() != 0 {
		t.Errorf("%d connections; conn 0: %d BEGINs, %d COMMITs, %d ROLLBACKs; want 1, 1, 1, 0",
			f.opens.Load(), fc.begins.Load(), fc.commits.Load(), fc.rollbacks.Load())
	}
}

// TestRunTxBeginRefusedNotRetried: with TxAttempts(1), the refusal at
// BEGIN is returned as it is: the caller sees the connect error (it
// matches ECONNREFUSED), not a transaction error.
func TestRunTxBeginRefusedNotRetried(t *testing.T) {
	f := &refusingConnector{fakeConnector: &fakeConnector{shape: shapeMySQL}}
	f.refuse.Store(1 << 30)
	c, err := NewConnector(f, opts(func(o *Options) { o.ConnectWait = 0 }))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(c)
	defer db.Close()
	fnRuns := 0
	err = RunTx(context.Background(), db, nil, func(context.Context, *sql.Tx) error { fnRuns++; return nil }, TxAttempts(1))
	if !errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, ErrTxAborted) || errors.Is(err, ErrCommitUnknown) || fnRuns != 0 {
		t.Fatalf("err %v, fn ran %d times; want the refusal, fn never run", err, fnRuns)
	}
}

// midRowsConnector hands out mysql-like fakes whose queries inside a
// transaction stream one row and then fail with failErr while the rows are
// read, the way MariaDB reports a deadlock met by a locking read that had
// already sent rows; with endsTx the server has then rolled the
// transaction back, so what follows runs in autocommit (autoExecs).
type midRowsConnector struct {
	*fakeConnector
	failErr error
	endsTx  bool
}

func (m *midRowsConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := m.fakeConnector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &midRowsConn{mysqlLikeConn: dc.(*mysqlLikeConn), m: m}, nil
}

type midRowsConn struct {
	*mysqlLikeConn
	m *midRowsConnector
}

func (c *midRowsConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	if !c.txOpenNow {
		return c.mysqlLikeConn.QueryContext(ctx, q, args)
	}
	c.queries.Add(1)
	return &failingRows{c: c}, nil
}

type failingRows struct {
	c    *midRowsConn
	sent bool
}

func (r *failingRows) Columns() []string { return []string{"v"} }
func (r *failingRows) Close() error      { return nil }
func (r *failingRows) Next(dest []driver.Value) error {
	if !r.sent {
		r.sent = true
		dest[0] = int64(1)
		return nil
	}
	if r.c.m.endsTx {
		r.c.txOpenNow = false // InnoDB rolled the whole transaction back
	}
	return r.c.m.failErr
}

// TestTxGuardMySQLDeadlockWhileReadingRows: MariaDB's 1213 can arrive
// after a locking read has streamed rows, from rows.Next rather than from
// QueryContext (integration's TestTxGuardMariaDBDeadlockMidRows shows it on
// a real server). The transaction is gone all the same, so the guard must
// refuse what follows as it does for a deadlocked Exec.
//
// LIBRARY BUG (issue 9, transaction guard): this test fails. Rows are
// returned untouched (conn.QueryContext, stmt.QueryContext), so an error
// met while reading them never reaches noteTxFailure: the next INSERT
// runs in autocommit and Commit returns nil.
func TestTxGuardMySQLDeadlockWhileReadingRows(t *testing.T) {
	m := &midRowsConnector{fakeConnector: &fakeConnector{shape: shapeMySQL}, failErr: errMyDead, endsTx: true}
	c, err := NewConnector(m, opts(nil))
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(c)
	defer db.Close()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, "SELECT id FROM t ORDER BY id FOR UPDATE")
	if err != nil {
		t.Fatalf("query: %v", err)
	}
	for rows.Next() {
	}
	if err := rows.Err(); !isMySQLDeadlock(err) {
		t.Fatalf("rows.Err: %v, want the 1213", err)
	}
	rows.Close()
	_, insErr := tx.ExecContext(ctx, "INSERT INTO t VALUES (3)")
	fc := m.conn(0)
	if !errors.Is(insErr, ErrTxAborted) || fc.autoExecs.Load() != 0 {
		t.Errorf("INSERT after the deadlock: %v, and %d statements ran in autocommit; want ErrTxAborted and 0", insErr, fc.autoExecs.Load())
	}
	if err := tx.Commit(); !errors.Is(err, ErrTxAborted) {
		t.Errorf("Commit after the deadlock: %v, want ErrTxAborted", err)
	}
}
