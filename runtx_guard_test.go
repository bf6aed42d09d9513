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
)

// RunTx and the transaction guard: the rollback that must come before a
// retry, and a BEGIN that never reached the server.

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
