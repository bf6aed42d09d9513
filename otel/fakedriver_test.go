package resilientotel_test

import (
	"context"
	"database/sql/driver"
	"io"
	"sync/atomic"
)

// fakeConnector makes in-memory connections that answer every query with
// one row holding 1. A connection whose failReset is set refuses its next
// checkout the way a driver does when its socket check finds the server
// gone, so a test can cause exactly one driver_reset discard.
type fakeConnector struct {
	opened atomic.Int64
	last   atomic.Pointer[fakeConn]
}

func (f *fakeConnector) Connect(context.Context) (driver.Conn, error) {
	f.opened.Add(1)
	c := &fakeConn{}
	f.last.Store(c)
	return c, nil
}

func (f *fakeConnector) Driver() driver.Driver { return fakeDriver{f} }

type fakeDriver struct{ f *fakeConnector }

func (d fakeDriver) Open(string) (driver.Conn, error) { return d.f.Connect(context.Background()) }

type fakeConn struct{ failReset atomic.Bool }

var (
	_ driver.QueryerContext  = (*fakeConn)(nil)
	_ driver.SessionResetter = (*fakeConn)(nil)
	_ driver.Pinger          = (*fakeConn)(nil)
)

func (c *fakeConn) Prepare(string) (driver.Stmt, error) { return nil, driver.ErrSkip }
func (c *fakeConn) Close() error                        { return nil }
func (c *fakeConn) Begin() (driver.Tx, error)           { return fakeTx{}, nil }
func (c *fakeConn) Ping(context.Context) error          { return nil }

func (c *fakeConn) ResetSession(context.Context) error {
	if c.failReset.Load() {
		return driver.ErrBadConn
	}
	return nil
}

func (c *fakeConn) QueryContext(context.Context, string, []driver.NamedValue) (driver.Rows, error) {
	return &oneRow{}, nil
}

type fakeTx struct{}

func (fakeTx) Commit() error   { return nil }
func (fakeTx) Rollback() error { return nil }

type oneRow struct{ done bool }

func (r *oneRow) Columns() []string { return []string{"one"} }
func (r *oneRow) Close() error      { return nil }

func (r *oneRow) Next(dest []driver.Value) error {
	if r.done {
		return io.EOF
	}
	r.done = true
	dest[0] = int64(1)
	return nil
}
