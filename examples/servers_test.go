package examples

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib" // "pgx", the bare driver the killer uses

	_ "github.com/resilientpg/resilientpg" // "resilientpg" and "resilientmysql"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

const (
	envPostgresDSN = "RESILIENTPG_TEST_POSTGRES_DSN"
	envMySQLDSN    = "RESILIENTPG_TEST_MYSQL_DSN"

	poolSize    = 5               // connections filled, then killed
	burstOps    = 50              // operations after the kill
	burstConc   = 5               // workers running them
	opTimeout   = 5 * time.Second // deadline of one operation
	settleAfter = 100 * time.Millisecond
)

// The servers: the ones the environment names, or throwaway ones started
// once per test binary, as in integration/helpers_test.go.
var servers struct {
	pgOnce, myOnce sync.Once
	pg             *faultlab.Postgres
	my             *faultlab.MariaDB
	pgDSN, myDSN   string
	pgErr, myErr   error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if servers.pg != nil {
		servers.pg.Close()
	}
	if servers.my != nil {
		servers.my.Close()
	}
	os.Exit(code)
}

func init() {
	// go-sql-driver/mysql logs every dead connection it drops; the tests
	// drop them on purpose.
	_ = mysql.SetLogger(log.New(io.Discard, "", 0))
}

func postgresDSN(tb testing.TB) string {
	tb.Helper()
	servers.pgOnce.Do(func() {
		if servers.pgDSN = os.Getenv(envPostgresDSN); servers.pgDSN != "" {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		servers.pg, servers.pgErr = faultlab.StartPostgres(ctx, faultlab.PostgresOptions{})
		if servers.pgErr == nil {
			servers.pgDSN = servers.pg.DSN("test")
		}
	})
	return requireServer(tb, "PostgreSQL", "pgx", envPostgresDSN, servers.pgDSN, servers.pgErr)
}

func mysqlDSN(tb testing.TB) string {
	tb.Helper()
	servers.myOnce.Do(func() {
		if servers.myDSN = os.Getenv(envMySQLDSN); servers.myDSN != "" {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		servers.my, servers.myErr = faultlab.StartMariaDB(ctx, faultlab.MariaDBOptions{})
		if servers.myErr == nil {
			servers.myDSN = servers.my.DSN("test")
		}
	})
	return requireServer(tb, "MariaDB/MySQL", "mysql", envMySQLDSN, servers.myDSN, servers.myErr)
}

// requireServer fails when CI is set and the server is unusable; elsewhere
// only missing binaries or an unreachable configured server skip.
func requireServer(tb testing.TB, what, driverName, env, dsn string, startErr error) string {
	tb.Helper()
	ci := os.Getenv("CI") != ""
	if startErr != nil {
		switch {
		case ci:
			tb.Fatalf("throwaway %s server did not start (CI is set, so this is a failure): %v", what, startErr)
		case errors.Is(startErr, faultlab.ErrNotInstalled):
			tb.Skipf("no %s server: %v; install it (bash .ci/setup) or set %s", what, startErr, env)
		default:
			tb.Fatalf("throwaway %s server did not start: %v", what, startErr)
		}
	}
	db, err := sql.Open(driverName, dsn)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err = db.PingContext(ctx)
		cancel()
		db.Close()
	}
	if err != nil {
		if ci {
			tb.Fatalf("%s server unreachable (CI is set, so this is a failure): %v; check %s", what, err, env)
		}
		tb.Skipf("%s server unreachable: %v; set %s to a reachable DSN", what, err, env)
	}
	return dsn
}

var seq atomic.Int64

// target is one test's own slice of a server, so that parallel tests (and
// other runs against a shared server) never kill each other's sessions:
// on PostgreSQL a unique application_name, on MySQL a database of its own.
type target struct {
	mysql    bool
	driver   string // "resilientpg" or "resilientmysql"
	dsn      string // the test's DSN for the wrapper's driver
	adminDSN string // the server's DSN, for the bare driver that kills
	tag      string // the application_name or the database name
}

func pgTarget(t *testing.T, name string) target {
	t.Helper()
	base := postgresDSN(t)
	tag := fmt.Sprintf("ex_%s_%d_%d", name, os.Getpid(), seq.Add(1))
	dsn := base + " application_name=" + tag
	if strings.HasPrefix(base, "postgres://") || strings.HasPrefix(base, "postgresql://") {
		sep := "?"
		if strings.Contains(base, "?") {
			sep = "&"
		}
		dsn = base + sep + "application_name=" + tag
	}
	return target{driver: "resilientpg", dsn: dsn, adminDSN: base, tag: tag}
}

// myTarget creates the test's database (dropped at cleanup) and returns a
// DSN for it with parseTime, which the ORMs expect.
func myTarget(t *testing.T, name string) target {
	t.Helper()
	base := mysqlDSN(t)
	tag := fmt.Sprintf("ex_%s_%d_%d", name, os.Getpid(), seq.Add(1))
	cfg, err := mysql.ParseDSN(base)
	if err != nil {
		t.Fatalf("parse %s: %v", envMySQLDSN, err)
	}
	cfg.DBName = tag
	cfg.ParseTime = true
	tg := target{mysql: true, driver: "resilientmysql", dsn: cfg.FormatDSN(), adminDSN: base, tag: tag}
	tg.admin(t, "CREATE DATABASE "+tag)
	t.Cleanup(func() { tg.admin(t, "DROP DATABASE IF EXISTS "+tag) })
	return tg
}

// admin runs statements on a fresh bare-driver connection to the server.
func (tg target) admin(t *testing.T, stmts ...string) {
	t.Helper()
	drv := "pgx"
	if tg.mysql {
		drv = "mysql"
	}
	db, err := sql.Open(drv, tg.adminDSN)
	if err != nil {
		t.Fatalf("admin open: %v", err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, s := range stmts {
		if _, err := db.ExecContext(ctx, s); err != nil {
			t.Fatalf("admin %q: %v", s, err)
		}
	}
}

// open opens the test's *sql.DB with the wrapper's driver, closed at cleanup.
func (tg target) open(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open(tg.driver, tg.dsn)
	if err != nil {
		t.Fatalf("sql.Open(%q): %v", tg.driver, err)
	}
	t.Cleanup(func() { db.Close() })
	sizePool(db)
	return db
}

func sizePool(db *sql.DB) {
	db.SetMaxOpenConns(poolSize)
	db.SetMaxIdleConns(poolSize)
}
