package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"
)

var optionalStmtInterfaces = map[string]reflect.Type{
	"StmtExecContext":   reflect.TypeFor[driver.StmtExecContext](),
	"StmtQueryContext":  reflect.TypeFor[driver.StmtQueryContext](),
	"NamedValueChecker": reflect.TypeFor[driver.NamedValueChecker](),
	"ColumnConverter":   reflect.TypeFor[driver.ColumnConverter](), //lint:ignore SA1019 checked on purpose
}

func stmtInterfaces(t reflect.Type) map[string]bool { return implementedOf(t, optionalStmtInterfaces) }

// TestPgxStmtInterfaces pins pgx's *stdlib.Stmt; a pgx upgrade that changes
// it needs a look at stmt.go.
func TestPgxStmtInterfaces(t *testing.T) {
	want := map[string]bool{"StmtExecContext": true, "StmtQueryContext": true}
	if got := stmtInterfaces(reflect.TypeFor[*stdlib.Stmt]()); !reflect.DeepEqual(got, want) {
		t.Fatalf("*stdlib.Stmt implements %v, stmt.go was written for %v", got, want)
	}
}

// fakeStmtConn prepares statements of a chosen shape.
type fakeStmtConn struct {
	shape   string // "legacy", "ctx", "mysql" (ctx + checker + ColumnConverter)
	execErr error  // returned by every statement's exec
	execs   *atomic.Int64
	checked *atomic.Int64 // CheckNamedValue calls reaching the statement
	closed  bool
}

func (c *fakeStmtConn) Prepare(string) (driver.Stmt, error) {
	base := &legacyStmt{c: c}
	switch c.shape {
	case "ctx":
		return &ctxStmt{base}, nil
	case "mysql":
		return &mysqlLikeStmt{ctxStmt{base}}, nil
	}
	return base, nil
}
func (c *fakeStmtConn) Close() error              { c.closed = true; return nil }
func (c *fakeStmtConn) Begin() (driver.Tx, error) { return nil, errors.New("no transactions") }

type legacyStmt struct{ c *fakeStmtConn }

func (s *legacyStmt) Close() error  { return nil }
func (s *legacyStmt) NumInput() int { return -1 }
func (s *legacyStmt) Exec([]driver.Value) (driver.Result, error) {
	s.c.execs.Add(1)
	if s.c.execErr != nil {
		return nil, s.c.execErr
	}
	return driver.RowsAffected(1), nil
}
func (s *legacyStmt) Query([]driver.Value) (driver.Rows, error) {
	s.c.execs.Add(1)
	if s.c.execErr != nil {
		return nil, s.c.execErr
	}
	return &fakeRows{vals: []int64{1}}, nil
}

type ctxStmt struct{ *legacyStmt }

func (s *ctxStmt) ExecContext(context.Context, []driver.NamedValue) (driver.Result, error) {
	return s.Exec(nil)
}
func (s *ctxStmt) QueryContext(context.Context, []driver.NamedValue) (driver.Rows, error) {
	return s.Query(nil)
}

type mysqlLikeStmt struct{ ctxStmt }

func (s *mysqlLikeStmt) CheckNamedValue(*driver.NamedValue) error { s.c.checked.Add(1); return nil }
func (s *mysqlLikeStmt) ColumnConverter(int) driver.ValueConverter {
	return driver.DefaultParameterConverter
}

type fakeStmtConnector struct {
	shape   string
	mu      sync.Mutex
	conns   []*fakeStmtConn
	failing int   // how many of the first conns fail every statement
	err     error // with this
	execs   atomic.Int64
	checked atomic.Int64
}

func (f *fakeStmtConnector) Connect(context.Context) (driver.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := &fakeStmtConn{shape: f.shape, execs: &f.execs, checked: &f.checked}
	if len(f.conns) < f.failing {
		c.execErr = f.err
	}
	f.conns = append(f.conns, c)
	return c, nil
}
func (f *fakeStmtConnector) Driver() driver.Driver { return nil }

// TestStmtParity: the wrapped statement has exactly the inner one's
// ColumnConverter, and for everything else does what database/sql does
// with the inner statement directly.
func TestStmtParity(t *testing.T) {
	ctx := context.Background()
	for _, shape := range []string{"legacy", "ctx", "mysql"} {
		t.Run(shape, func(t *testing.T) {
			f := &fakeStmtConnector{shape: shape}
			c, err := NewConnector(f, DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			dc, err := c.Connect(ctx)
			if err != nil {
				t.Fatal(err)
			}
			w := dc.(*conn)
			ds, err := w.PrepareContext(ctx, "q")
			if err != nil {
				t.Fatal(err)
			}
			inner := ds.(interface{ Unwrap() driver.Stmt }).Unwrap()
			innerSet, wrapSet := stmtInterfaces(reflect.TypeOf(inner)), stmtInterfaces(reflect.TypeOf(ds))
			if innerSet["ColumnConverter"] != wrapSet["ColumnConverter"] {
				t.Errorf("ColumnConverter: inner %v, wrapper %v", innerSet["ColumnConverter"], wrapSet["ColumnConverter"])
			}
			if !wrapSet["StmtExecContext"] || !wrapSet["StmtQueryContext"] || !wrapSet["NamedValueChecker"] {
				t.Errorf("wrapper implements %v", wrapSet)
			}
			se := ds.(driver.StmtExecContext)
			if _, err := se.ExecContext(ctx, []driver.NamedValue{{Ordinal: 1, Value: int64(1)}}); err != nil || f.execs.Load() != 1 {
				t.Errorf("ExecContext: err %v, execs %d", err, f.execs.Load())
			}
			if _, err := ds.(driver.StmtQueryContext).QueryContext(ctx, nil); err != nil || f.execs.Load() != 2 {
				t.Errorf("QueryContext: err %v, execs %d", err, f.execs.Load())
			}
			if !innerSet["StmtExecContext"] {
				// database/sql's fallback: no named arguments, and a done
				// context is checked before the legacy call.
				_, err := se.ExecContext(ctx, []driver.NamedValue{{Name: "n", Ordinal: 1, Value: 1}})
				if err == nil || err.Error() != "sql: driver does not support the use of Named Parameters" {
					t.Errorf("legacy Exec with a named arg: %v", err)
				}
				cctx, cancel := context.WithCancel(ctx)
				cancel()
				if _, err := se.ExecContext(cctx, nil); err != context.Canceled {
					t.Errorf("legacy Exec on a cancelled ctx: %v, want context.Canceled", err)
				}
			}
			err = ds.(driver.NamedValueChecker).CheckNamedValue(&driver.NamedValue{Value: 1})
			switch {
			case innerSet["NamedValueChecker"]:
				if err != nil || f.checked.Load() != 1 {
					t.Errorf("CheckNamedValue not forwarded to the statement: %v, %d", err, f.checked.Load())
				}
			case err != driver.ErrSkip:
				// Neither the statement nor the conn checks: database/sql
				// goes on to ColumnConverter or its default.
				t.Errorf("CheckNamedValue: %v, want ErrSkip", err)
			}
		})
	}
}

// TestPreparedReadOnlyRetried: go-sql-driver/mysql runs a statement with
// arguments as a prepared statement, so a demoted primary's 1290 comes from
// the statement. With reject_read_only the wrapper retires the pool and
// database/sql runs the statement again on a new connection.
func TestPreparedReadOnlyRetried(t *testing.T) {
	readOnly := &mysql.MySQLError{Number: 1290, Message: "The MariaDB server is running with the --read-only option so it cannot execute this statement"}
	for _, policy := range []ReadOnlyPolicy{ReadOnlyReject, ReadOnlyAllow} {
		t.Run(policy.String(), func(t *testing.T) {
			f := &fakeStmtConnector{shape: "mysql", failing: 1, err: readOnly}
			o := DefaultOptions()
			o.RejectReadOnly = policy
			c, err := NewConnector(f, o)
			if err != nil {
				t.Fatal(err)
			}
			db := sql.OpenDB(c)
			defer db.Close()
			holdAndRelease(t, db, 1) // the pool holds the read-only connection
			st, err := db.Prepare("INSERT INTO t VALUES (?)")
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			_, err = st.Exec(1)
			s := c.Stats()
			if policy == ReadOnlyAllow {
				if !errors.As(err, new(*mysql.MySQLError)) || f.execs.Load() != 1 {
					t.Fatalf("allow: err %v after %d execs, want the 1290 after one", err, f.execs.Load())
				}
				return
			}
			if err != nil {
				t.Fatalf("Exec: %v", err)
			}
			if f.execs.Load() != 2 || s.Retries[ReasonReadOnly] != 1 || s.Invalidations[InvalidReadOnly] != 1 {
				t.Errorf("execs %d, read-only retries %d, invalidations %v: want 2, 1, one read-only",
					f.execs.Load(), s.Retries[ReasonReadOnly], s.Invalidations)
			}
		})
	}
}

// TestPreparedLostMidFlightNotRetried: a prepared statement that loses its
// connection in flight is not run again, and its connection is discarded.
func TestPreparedLostMidFlightNotRetried(t *testing.T) {
	f := &fakeStmtConnector{shape: "ctx", failing: 1, err: io.ErrUnexpectedEOF}
	c, err := NewConnector(f, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(c)
	defer db.Close()
	holdAndRelease(t, db, 1)
	st, err := db.Prepare("UPDATE t SET n = n + 1")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_, err = st.Exec()
	var se *StatementError
	if !errors.As(err, &se) || se.Reason != ReasonMayHaveRun || !errors.Is(err, io.ErrUnexpectedEOF) || f.execs.Load() != 1 {
		t.Fatalf("err %v after %d execs: want a may-have-run StatementError after one", err, f.execs.Load())
	}
	if _, err := st.Exec(); err != nil || f.execs.Load() != 2 {
		t.Fatalf("next Exec: %v (%d execs), want success on a new connection", err, f.execs.Load())
	}
	if len(f.conns) != 2 || !f.conns[0].closed {
		t.Errorf("%d conns, first closed %v: want the lost one discarded", len(f.conns), f.conns[0].closed)
	}
}
