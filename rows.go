package resilientpg

import (
	"context"
	"database/sql/driver"
	"io"
	"reflect"
)

// txRows wraps the rows of a query run inside a transaction, so that an
// error met while reading them reaches the transaction guard: MySQL and
// MariaDB report a deadlock that a locking read (SELECT ... FOR UPDATE)
// hits after sending its first rows as an error of the rows, and by then
// the server has rolled the whole transaction back; without the guard the
// next statement on the *sql.Tx would commit on its own. Rows outside a
// transaction are returned untouched, so the ordinary query path costs
// nothing more.
//
// It implements every optional Rows interface database/sql looks for,
// answering as database/sql does for rows without one: scan type any, no
// database type name, no length, nullability or precision, no next result
// set. A driver's RowsColumnScanner (Go 1.27) is not forwarded: the
// wrapper reads through Next, which such drivers keep for older Go.
type txRows struct {
	inner driver.Rows
	c     *conn
}

var (
	_ driver.Rows                           = (*txRows)(nil)
	_ driver.RowsNextResultSet              = (*txRows)(nil)
	_ driver.RowsColumnTypeScanType         = (*txRows)(nil)
	_ driver.RowsColumnTypeDatabaseTypeName = (*txRows)(nil)
	_ driver.RowsColumnTypeLength           = (*txRows)(nil)
	_ driver.RowsColumnTypeNullable         = (*txRows)(nil)
	_ driver.RowsColumnTypePrecisionScale   = (*txRows)(nil)
)

// wrapRows wraps r when it belongs to a transaction the guard watches.
func (c *conn) wrapRows(r driver.Rows, inTx bool) driver.Rows {
	if !c.tx.active || !inTx {
		return r
	}
	return &txRows{inner: r, c: c}
}

// failed hands an error of the rows to the guard: a deadlock or a lost
// connection ends the transaction, and the statement's error says so.
func (r *txRows) failed(err error) error {
	if err == nil || err == io.EOF || !r.c.tx.active {
		return err
	}
	return r.c.handleErr(context.Background(), err, true)
}

// Unwrap returns the inner driver rows.
func (r *txRows) Unwrap() driver.Rows { return r.inner }

func (r *txRows) Columns() []string { return r.inner.Columns() }

func (r *txRows) Close() error { return r.failed(r.inner.Close()) }

func (r *txRows) Next(dest []driver.Value) error { return r.failed(r.inner.Next(dest)) }

func (r *txRows) HasNextResultSet() bool {
	if n, ok := r.inner.(driver.RowsNextResultSet); ok {
		return n.HasNextResultSet()
	}
	return false
}

func (r *txRows) NextResultSet() error {
	if n, ok := r.inner.(driver.RowsNextResultSet); ok {
		return r.failed(n.NextResultSet())
	}
	return io.EOF
}

func (r *txRows) ColumnTypeScanType(i int) reflect.Type {
	if t, ok := r.inner.(driver.RowsColumnTypeScanType); ok {
		return t.ColumnTypeScanType(i)
	}
	return reflect.TypeFor[any]()
}

func (r *txRows) ColumnTypeDatabaseTypeName(i int) string {
	if t, ok := r.inner.(driver.RowsColumnTypeDatabaseTypeName); ok {
		return t.ColumnTypeDatabaseTypeName(i)
	}
	return ""
}

func (r *txRows) ColumnTypeLength(i int) (int64, bool) {
	if t, ok := r.inner.(driver.RowsColumnTypeLength); ok {
		return t.ColumnTypeLength(i)
	}
	return 0, false
}

func (r *txRows) ColumnTypeNullable(i int) (bool, bool) {
	if t, ok := r.inner.(driver.RowsColumnTypeNullable); ok {
		return t.ColumnTypeNullable(i)
	}
	return false, false
}

func (r *txRows) ColumnTypePrecisionScale(i int) (int64, int64, bool) {
	if t, ok := r.inner.(driver.RowsColumnTypePrecisionScale); ok {
		return t.ColumnTypePrecisionScale(i)
	}
	return 0, 0, false
}
