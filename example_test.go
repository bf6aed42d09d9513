package resilientpg_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/DATA-DOG/go-sqlmock"
	"github.com/jackc/pgx/v5"
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
