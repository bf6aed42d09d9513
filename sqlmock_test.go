package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"testing"

	"github.com/DATA-DOG/go-sqlmock"
	"github.com/stretchr/testify/require"
)

// go-sqlmock serves as an arbitrary inner driver: the generic wrapping path
// (a driver.Driver and its DSN, no DriverContext) with scripted results and
// errors.
func mockDB(t *testing.T, o Options, opts ...func(*sqlmock.Sqlmock) error) (*sql.DB, sqlmock.Sqlmock) {
	t.Helper()
	dsn := "mock_" + t.Name()
	raw, mock, err := sqlmock.NewWithDSN(dsn, sqlmock.MonitorPingsOption(true))
	require.NoError(t, err)
	t.Cleanup(func() { raw.Close() })
	db, err := OpenDB(raw.Driver(), o, dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	return db, mock
}

func TestSQLMockPassThrough(t *testing.T) {
	db, mock := mockDB(t, DefaultOptions())
	ctx := context.Background()
	mock.ExpectExec("INSERT INTO t").WithArgs(1, "a").WillReturnResult(sqlmock.NewResult(10, 1))
	mock.ExpectQuery("SELECT v FROM t").WithArgs(1).WillReturnRows(sqlmock.NewRows([]string{"v"}).AddRow("a"))
	mock.ExpectBegin()
	mock.ExpectExec("UPDATE t").WillReturnResult(sqlmock.NewResult(0, 1))
	mock.ExpectCommit()

	res, err := db.ExecContext(ctx, "INSERT INTO t VALUES (?, ?)", 1, "a")
	require.NoError(t, err)
	id, _ := res.LastInsertId()
	require.EqualValues(t, 10, id)
	var v string
	require.NoError(t, db.QueryRowContext(ctx, "SELECT v FROM t WHERE id = ?", 1).Scan(&v))
	require.Equal(t, "a", v)
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = tx.ExecContext(ctx, "UPDATE t SET v = 'b'")
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	require.NoError(t, mock.ExpectationsWereMet())
}

// TestSQLMockErrors: a driver error passes through untouched and keeps the
// conn; ErrBadConn from the driver marks the conn bad so database/sql's own
// retry runs the statement on a new connection.
func TestSQLMockErrors(t *testing.T) {
	db, mock := mockDB(t, DefaultOptions())
	db.SetMaxIdleConns(1)
	ctx := context.Background()
	sqlErr := errors.New("duplicate key")
	mock.ExpectExec("INSERT").WillReturnError(sqlErr)
	mock.ExpectQuery("SELECT 1").WillReturnError(driver.ErrBadConn)
	mock.ExpectQuery("SELECT 1").WillReturnRows(sqlmock.NewRows([]string{"v"}).AddRow(1))

	_, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)")
	require.ErrorIs(t, err, sqlErr)
	var n int
	require.NoError(t, db.QueryRowContext(ctx, "SELECT 1").Scan(&n))
	require.Equal(t, 1, n)
	require.NoError(t, mock.ExpectationsWereMet())
	// The first conn survived the SQL error and was discarded for ErrBadConn;
	// the retry opened a second one.
	require.EqualValues(t, 1, db.Stats().OpenConnections)
}

// TestSQLMockCheckoutPing: with resilient_ping=always a used conn is pinged
// through the inner driver's Pinger, and a failed ping sends database/sql
// to a new connection before the query is sent.
func TestSQLMockCheckoutPing(t *testing.T) {
	o := DefaultOptions()
	o.Ping = PingAlways
	db, mock := mockDB(t, o)
	ctx := context.Background()
	mock.ExpectQuery("SELECT 1").WillReturnRows(sqlmock.NewRows([]string{"v"}).AddRow(1))
	mock.ExpectPing().WillReturnError(io.EOF) // checkout of the used conn
	mock.ExpectQuery("SELECT 2").WillReturnRows(sqlmock.NewRows([]string{"v"}).AddRow(2))

	var n int
	require.NoError(t, db.QueryRowContext(ctx, "SELECT 1").Scan(&n))
	require.NoError(t, db.QueryRowContext(ctx, "SELECT 2").Scan(&n))
	require.Equal(t, 2, n)
	require.NoError(t, mock.ExpectationsWereMet())
}
