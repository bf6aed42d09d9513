package resilientpg_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/DATA-DOG/go-sqlmock"
	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
)

// The drop-in: the DSN of pgx, plus resilient_ keys. It needs a server, so
// it is compiled but not run.
func Example() {
	db, err := sql.Open("resilientpg", "postgres://app@db:5432/app?sslmode=require&resilient_max_age=30m")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRowContext(context.Background(), "SELECT 1").Scan(&n); err != nil {
		log.Fatal(err)
	}
}

// Bad configuration fails at sql.Open, names the key, the value and what is
// allowed, and never shows the password.
func Example_configError() {
	_, err := sql.Open("resilientmysql", "app:secret@tcp(db:3306)/app?resilient_ping=sometimes")
	fmt.Println(err)
	var ce *resilientpg.ConfigError
	fmt.Println(errors.As(err, &ce), ce.Key)
	_, err = sql.Open("resilientpg", "host=db password=secret resilient_max_open_conns=10")
	fmt.Println(err != nil)
	// Output:
	// resilientpg: invalid resilient_ping="sometimes": want always, idle or never
	// true resilient_ping
	// true
}

// Open is sql.Open plus the pool-size keys, which need the *sql.DB.
func ExampleOpen() {
	db, err := resilientpg.Open("resilientpg", "postgres://app@db/app?resilient_max_open_conns=20&resilient_max_idle_conns=20")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	fmt.Println(db.Stats().MaxOpenConnections)
	// Output: 20
}

// NewConnector wraps any driver; here go-sqlmock stands for one.
func ExampleNewConnector() {
	mockDB, mock, _ := sqlmock.NewWithDSN("example")
	defer mockDB.Close()
	mock.ExpectQuery("SELECT 42").WillReturnRows(sqlmock.NewRows([]string{"n"}).AddRow(42))

	opts := resilientpg.DefaultOptions()
	opts.Ping = resilientpg.PingAlways
	opts.MaxAge = 10 * time.Minute
	c, err := resilientpg.NewConnector(mockDB.Driver(), opts, "example")
	if err != nil {
		log.Fatal(err)
	}
	db := sql.OpenDB(c)
	defer db.Close()
	var n int
	_ = db.QueryRow("SELECT 42").Scan(&n)
	fmt.Println(n)
	// Output: 42
}

// UnwrapConn reaches pgx inside sql.Conn.Raw, for CopyFrom or LISTEN/NOTIFY.
func ExampleUnwrapConn() {
	ctx := context.Background()
	db, _ := sql.Open("resilientpg", "postgres://app@db/app")
	sc, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer sc.Close()
	err = sc.Raw(func(dc any) error {
		conn := resilientpg.UnwrapConn(dc).(*stdlib.Conn).Conn()
		rows := [][]any{{1, "a"}, {2, "b"}}
		_, err := conn.CopyFrom(ctx, pgx.Identifier{"items"}, []string{"id", "name"}, pgx.CopyFromRows(rows))
		return err
	})
	if err != nil {
		log.Fatal(err)
	}
}

// OpenDB wraps a connector (here pgx's, built in code with its own options)
// and sizes the pool, which only the owner of the *sql.DB can do.
func ExampleOpenDB() {
	cfg, err := pgx.ParseConfig("postgres://app@db:5432/app")
	if err != nil {
		log.Fatal(err)
	}
	opts := resilientpg.DefaultOptions()
	opts.MaxAge = 15 * time.Minute
	opts.MaxAgeJitter = resilientpg.JitterDuration(time.Minute)
	opts.MaxOpenConns, opts.MaxIdleConns = 20, 20
	db, err := resilientpg.OpenDB(stdlib.GetConnector(*cfg), opts)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	fmt.Println(db.Stats().MaxOpenConnections)
	// Output: 20
}

// DefaultOptions is what a DSN without resilient_ keys gets; Options
// returns what a connector was made with.
func ExampleDefaultOptions() {
	c, err := pgxConnector("postgres://app@db/app?resilient_ping=always&resilient_max_age_jitter=5%25")
	if err != nil {
		log.Fatal(err)
	}
	d, o := resilientpg.DefaultOptions(), c.Options()
	fmt.Println(d.Ping, d.PingIdle, d.PingTimeout, d.MaxAge, d.MaxAgeJitter)
	fmt.Println(o.Ping, o.PingIdle, o.PingTimeout, o.MaxAge, o.MaxAgeJitter)
	// Output:
	// idle 1s 2s 30m0s 10%
	// always 1s 2s 30m0s 5%
}

func pgxConnector(dsn string) (*resilientpg.Connector, error) {
	return resilientpg.NewConnector(stdlib.GetDefaultDriver(), resilientpg.DefaultOptions(), dsn)
}

// KnownKeys lists the DSN keys, for a configuration linter or a help text.
func ExampleKnownKeys() {
	keys := resilientpg.KnownKeys()
	fmt.Println(len(keys) > 10, keys[0])
	// Output: true resilient_ping
}

// WithIdempotent lets a statement that lost its connection mid-flight run
// again on another connection: only for statements that may run twice.
func ExampleWithIdempotent() {
	db, _ := sql.Open("resilientpg", "postgres://app@db/app")
	defer db.Close()
	ctx := resilientpg.WithIdempotent(context.Background())
	_, err := db.ExecContext(ctx, "INSERT INTO seen (id) VALUES ($1) ON CONFLICT DO NOTHING", 42)
	if err != nil {
		log.Print(err)
	}
}

// Classify and IsDisconnect tell what an error says about the connection.
func ExampleClassify() {
	for _, err := range []error{
		&pgconn.PgError{Code: "57P01"},
		&pgconn.PgError{Code: "40001"},
		&pgconn.PgError{Code: "23505"},
		&mysql.MySQLError{Number: 1040},
		fmt.Errorf("query: %w", io.ErrUnexpectedEOF),
		context.DeadlineExceeded,
	} {
		fmt.Printf("%s, disconnect %v\n", resilientpg.Classify(err), resilientpg.IsDisconnect(err))
	}
	// Output:
	// server shutdown, disconnect true
	// serialization, disconnect false
	// other, disconnect false
	// cannot connect, disconnect false
	// connection lost, disconnect true
	// canceled, disconnect false
}

// A statement whose connection was lost mid-flight is not retried, and its
// error says why; the driver's own error is still in the chain. go-sqlmock
// stands for a driver here.
func ExampleStatementError() {
	mockDB, mock, _ := sqlmock.NewWithDSN("statement-error")
	defer mockDB.Close()
	mock.ExpectExec("INSERT").WillReturnError(io.ErrUnexpectedEOF)

	c, _ := resilientpg.NewConnector(mockDB.Driver(), resilientpg.DefaultOptions(), "statement-error")
	db := sql.OpenDB(c)
	defer db.Close()
	_, err := db.Exec("INSERT INTO orders VALUES (1)")
	var se *resilientpg.StatementError
	fmt.Println(errors.As(err, &se), se.Reason, se.Reason.Retried(), errors.Is(err, io.ErrUnexpectedEOF))
	fmt.Println(err)
	// Output:
	// true may have run false true
	// resilientpg: connection lost while the statement was in flight (connection lost); not retried, because the server may have executed it; if running it twice is safe, pass a context made by resilientpg.WithIdempotent: unexpected EOF
}

// JitterPercent and JitterDuration spread each connection's max age.
func ExampleJitterPercent() {
	opts := resilientpg.DefaultOptions()
	opts.MaxAge = time.Hour
	opts.MaxAgeJitter = resilientpg.JitterPercent(5) // each lives 57 to 60 minutes
	fmt.Println(opts.MaxAgeJitter)
	opts.MaxAgeJitter = resilientpg.JitterDuration(2 * time.Minute)
	fmt.Println(opts.MaxAgeJitter)
	// Output:
	// 5%
	// 2m0s
}

// IsDisconnect tells a caller whether the connection an error came from is
// gone, for example to decide whether to alert or to retry at a higher
// level.
func ExampleIsDisconnect() {
	err := fmt.Errorf("load orders: %w", &mysql.MySQLError{Number: 1927, Message: "Connection was killed"})
	fmt.Println(resilientpg.IsDisconnect(err), resilientpg.IsDisconnect(sql.ErrNoRows))
	// Output: true false
}

// Driver.Unwrap returns the inner driver, for code that picks an SQL
// dialect from db.Driver().
func ExampleDriver_Unwrap() {
	db, _ := sql.Open("resilientmysql", "app@tcp(db:3306)/app")
	defer db.Close()
	_, isMySQL := db.Driver().(*resilientpg.Driver).Unwrap().(*mysql.MySQLDriver)
	fmt.Println(isMySQL)
	// Output: true
}

// RunTx runs a transaction and runs it again, whole, after a serialization
// failure or a deadlock; fn may therefore run more than once.
func ExampleRunTx() {
	db, _ := sql.Open("resilientpg", "postgres://app@db/app")
	defer db.Close()
	ctx := context.Background()
	err := resilientpg.RunTx(ctx, db, &sql.TxOptions{Isolation: sql.LevelSerializable},
		func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance - 10 WHERE id = 1")
			if err != nil {
				return err
			}
			_, err = tx.ExecContext(ctx, "UPDATE accounts SET balance = balance + 10 WHERE id = 2")
			return err
		}, resilientpg.TxAttempts(5))
	switch {
	case errors.Is(err, resilientpg.ErrCommitUnknown):
		log.Print("the transfer may or may not have happened: check before retrying")
	case err != nil:
		log.Print(err)
	}
}

// StatsOf reads the wrapper's counters behind a *sql.DB, beside
// db.Stats(): what it discarded and why, its pings, retries, outages and
// leaks. It reports false for a *sql.DB the wrapper does not drive.
func ExampleStatsOf() {
	db, _ := sql.Open("resilientpg", "postgres://app@db/app")
	defer db.Close()
	s, ok := resilientpg.StatsOf(db)
	fmt.Println(ok, s.Discards.Total(), s.Retries[resilientpg.ReasonNotSent], s.Gate.State)

	other, _ := sql.Open("pgx", "postgres://app@db/app")
	defer other.Close()
	_, ok = resilientpg.StatsOf(other)
	fmt.Println(ok)
	// Output:
	// true 0 0 up
	// false
}

// Events go to a log/slog logger (slog.Default() when Logger is nil), one
// record each with an "event" attribute: server.down, server.up,
// pool.invalidated, conn.discarded, leak.suspected, pool.exhausted...
// LeakThreshold reports a connection held longer than it, with the stack
// of the code that took it. The DSN keys resilient_log=warn and
// resilient_leak_threshold=30s do the same.
func ExampleOptions_observability() {
	opts := resilientpg.DefaultOptions()
	opts.Log = resilientpg.LogWarn
	opts.Logger = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	opts.LeakThreshold = 30 * time.Second
	db, err := resilientpg.OpenDB(stdlib.GetDefaultDriver(), opts, "postgres://app@db/app")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	fmt.Println(db.Driver() != nil)
	// Output: true
}
