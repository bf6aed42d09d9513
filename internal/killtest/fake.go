package killtest

import (
	"context"
	"database/sql/driver"
	"io"
	"sync/atomic"
)

// FakeConnector makes in-memory connections that answer every query with
// one row holding 1, for the exporters' unit tests.
type FakeConnector struct {
	opened atomic.Int64
	last   atomic.Pointer[fakeConn]
}

// Connect makes a connection.
func (f *FakeConnector) Connect(context.Context) (driver.Conn, error) {
	f.opened.Add(1)
	c := &fakeConn{}
	f.last.Store(c)
	return c, nil
}

// Driver returns a driver over f.
func (f *FakeConnector) Driver() driver.Driver { return fakeDriver{f} }

// FailNextReset makes the newest connection refuse its next checkout the
// way a driver does when its socket check finds the server gone, so a test
// can cause exactly one driver_reset discard.
func (f *FakeConnector) FailNextReset() { f.last.Load().failReset.Store(true) }

type fakeDriver struct{ f *FakeConnector }

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
