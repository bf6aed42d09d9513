package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
)

// The fakes follow database/sql's fakedb_test.go: counters, sticky state
// and hook functions, in three shapes that differ in the optional
// interfaces they implement:
//   - shapePgx: like pgx's *stdlib.Conn, everything but Validator;
//   - shapeMySQL: like go-sql-driver/mysql, with Validator and the legacy
//     Execer/Queryer;
//   - shapeBare: driver.Conn only, the minimum database/sql accepts;
//   - shapeLegacy: driver.Conn plus the legacy Execer/Queryer.
type fakeShape int

const (
	shapePgx fakeShape = iota
	shapeMySQL
	shapeBare
	shapeLegacy
)

func (s fakeShape) String() string {
	return [...]string{"pgx-like", "mysql-like", "bare", "legacy"}[s]
}

type fakeConnector struct {
	shape fakeShape

	opens  atomic.Int64
	closes atomic.Int64

	mu         sync.Mutex
	conns      []*fakeConn
	connectErr error           // returned by Connect while set
	onNew      func(*fakeConn) // configures each new conn
}

func (f *fakeConnector) Connect(ctx context.Context) (driver.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.connectErr != nil {
		return nil, f.connectErr
	}
	f.opens.Add(1)
	c := &fakeConn{parent: f, valid: true, id: len(f.conns)}
	if f.onNew != nil {
		f.onNew(c)
	}
	f.conns = append(f.conns, c)
	switch f.shape {
	case shapePgx:
		return &pgxLikeConn{c}, nil
	case shapeMySQL:
		return &mysqlLikeConn{pgxLikeConn{c}}, nil
	case shapeLegacy:
		return &legacyConn{c}, nil
	}
	return c, nil
}

func (f *fakeConnector) Driver() driver.Driver { return fakeDriver{f} }

func (f *fakeConnector) conn(i int) *fakeConn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.conns[i]
}

type fakeDriver struct{ f *fakeConnector }

func (d fakeDriver) Open(string) (driver.Conn, error) { return d.f.Connect(context.Background()) }

// fakeConn records what reached it. Its fields are used by one goroutine
// at a time, as database/sql guarantees for a driver.Conn; the counters
// are atomic because tests read them from outside.
type fakeConn struct {
	parent *fakeConnector
	id     int

	pings, resets, execs, queries, prepares, begins atomic.Int64
	closed                                          atomic.Bool

	valid     bool
	lastArgs  []driver.NamedValue
	lastQuery string
	pingCtx   context.Context

	pingErr  func(ctx context.Context) error
	resetErr error
	execErr  error
	// Transactions: beginErr fails BEGIN; txExecErrs are returned by the
	// statements of a transaction in turn (nil: success); commitErr and
	// rollbackErr by its end. commits and rollbacks count what was sent.
	beginErr             error
	txExecErrs           []error
	commitErr            error
	rollbackErr          error
	commits, rollbacks   atomic.Int64
	inTxExecs, autoExecs atomic.Int64 // statements run inside a transaction, and outside
	txOpenNow            bool
}

func (c *fakeConn) Prepare(q string) (driver.Stmt, error) {
	c.prepares.Add(1)
	c.lastQuery = q
	return fakeStmt{c}, nil
}

func (c *fakeConn) Close() error {
	if !c.closed.Swap(true) {
		c.parent.closes.Add(1)
	}
	return nil
}

func (c *fakeConn) Begin() (driver.Tx, error) {
	c.begins.Add(1)
	if c.beginErr != nil {
		return nil, c.beginErr
	}
	c.txOpenNow = true
	return fakeTx{c}, nil
}

// The pgx-like shape.
type pgxLikeConn struct{ *fakeConn }

func (c *pgxLikeConn) PrepareContext(_ context.Context, q string) (driver.Stmt, error) {
	return c.Prepare(q)
}

func (c *pgxLikeConn) BeginTx(context.Context, driver.TxOptions) (driver.Tx, error) {
	return c.Begin()
}

func (c *pgxLikeConn) ExecContext(_ context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	c.execs.Add(1)
	c.lastQuery, c.lastArgs = q, args
	if c.txOpenNow {
		c.inTxExecs.Add(1)
		if len(c.txExecErrs) > 0 {
			err := c.txExecErrs[0]
			c.txExecErrs = c.txExecErrs[1:]
			if err != nil {
				return nil, err
			}
		}
	} else {
		c.autoExecs.Add(1)
	}
	if c.execErr != nil {
		return nil, c.execErr
	}
	return driver.RowsAffected(1), nil
}

func (c *pgxLikeConn) QueryContext(_ context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	c.queries.Add(1)
	c.lastQuery, c.lastArgs = q, args
	if c.execErr != nil {
		return nil, c.execErr
	}
	return &fakeRows{vals: []int64{int64(c.id)}}, nil
}

func (c *pgxLikeConn) CheckNamedValue(*driver.NamedValue) error { return nil }

func (c *pgxLikeConn) Ping(ctx context.Context) error {
	c.pings.Add(1)
	c.pingCtx = ctx
	if c.pingErr != nil {
		return c.pingErr(ctx)
	}
	return nil
}

func (c *pgxLikeConn) ResetSession(context.Context) error {
	c.resets.Add(1)
	return c.resetErr
}

// The mysql-like shape.
type mysqlLikeConn struct{ pgxLikeConn }

func (c *mysqlLikeConn) IsValid() bool { return c.valid && !c.closed.Load() }

func (c *mysqlLikeConn) Exec(q string, args []driver.Value) (driver.Result, error) {
	return nil, errors.New("legacy Exec must not be used when ExecContext exists")
}

func (c *mysqlLikeConn) Query(q string, args []driver.Value) (driver.Rows, error) {
	return nil, errors.New("legacy Query must not be used when QueryContext exists")
}

// The legacy shape.
type legacyConn struct{ *fakeConn }

func (c *legacyConn) Exec(q string, args []driver.Value) (driver.Result, error) {
	c.execs.Add(1)
	c.lastQuery = q
	c.lastArgs = make([]driver.NamedValue, len(args))
	for i, v := range args {
		c.lastArgs[i] = driver.NamedValue{Ordinal: i + 1, Value: v}
	}
	return driver.RowsAffected(1), c.execErr
}

func (c *legacyConn) Query(q string, args []driver.Value) (driver.Rows, error) {
	c.queries.Add(1)
	c.lastQuery = q
	return &fakeRows{vals: []int64{int64(c.id)}}, c.execErr
}

type fakeStmt struct{ c *fakeConn }

func (s fakeStmt) Close() error  { return nil }
func (s fakeStmt) NumInput() int { return -1 }
func (s fakeStmt) Exec([]driver.Value) (driver.Result, error) {
	s.c.execs.Add(1)
	return driver.RowsAffected(1), nil
}
func (s fakeStmt) Query([]driver.Value) (driver.Rows, error) {
	s.c.queries.Add(1)
	return &fakeRows{vals: []int64{int64(s.c.id)}}, nil
}

type fakeTx struct{ c *fakeConn }

// Commit fails once with commitErr, as a server would for one transaction.
func (t fakeTx) Commit() error {
	t.c.commits.Add(1)
	t.c.txOpenNow = false
	err := t.c.commitErr
	t.c.commitErr = nil
	return err
}

func (t fakeTx) Rollback() error {
	t.c.rollbacks.Add(1)
	t.c.txOpenNow = false
	return t.c.rollbackErr
}

// fakeRows yields one int64 column.
type fakeRows struct {
	vals []int64
	i    int
}

func (r *fakeRows) Columns() []string { return []string{"v"} }
func (r *fakeRows) Close() error      { return nil }
func (r *fakeRows) Next(dest []driver.Value) error {
	if r.i >= len(r.vals) {
		return io.EOF
	}
	dest[0] = r.vals[r.i]
	r.i++
	return nil
}

// newFakeConnector wraps a fake of the given shape with opts.
func newFakeConnector(shape fakeShape, opts Options) (*Connector, *fakeConnector) {
	f := &fakeConnector{shape: shape}
	c, err := NewConnector(f, opts)
	if err != nil {
		panic(err)
	}
	return c, f
}

// connect returns the wrapper conn and its fake.
func connect(c *Connector, f *fakeConnector) (*conn, *fakeConn) {
	dc, err := c.Connect(context.Background())
	if err != nil {
		panic(err)
	}
	return dc.(*conn), f.conn(int(f.opens.Load()) - 1)
}

// holdAndRelease makes database/sql open n conns at once and pool them.
func holdAndRelease(t *testing.T, db *sql.DB, n int) {
	t.Helper()
	var held []*sql.Conn
	for range n {
		sc, err := db.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, sc)
	}
	for _, sc := range held {
		sc.Close()
	}
}
