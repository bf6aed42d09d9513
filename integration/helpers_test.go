package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers "pgx"

	_ "github.com/resilientpg/resilientpg" // registers "resilientpg" and "resilientmysql"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

const (
	envPostgresDSN = "RESILIENTPG_TEST_POSTGRES_DSN"
	envMySQLDSN    = "RESILIENTPG_TEST_MYSQL_DSN"
)

// The servers under test: the ones the environment names, or throwaway
// ones started once per test binary from the installed binaries, so that a
// fresh machine and CI need no configured service.
var servers struct {
	pgOnce, myOnce sync.Once
	pg             *faultlab.Postgres
	my             *faultlab.MariaDB
	pgDSN, myDSN   string
	pgErr, myErr   error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if !reportRecoveries() && code == 0 {
		code = 1
	}
	if servers.pg != nil {
		servers.pg.Close()
	}
	if servers.my != nil {
		servers.my.Close()
	}
	os.Exit(code)
}

// postgresDSN and mysqlDSN return the DSN under test, starting the
// throwaway server on first use; "" if it could not start.
func postgresDSN() string {
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
	return servers.pgDSN
}

func mysqlDSN() string {
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
	return servers.myDSN
}

// requirePostgres returns the PostgreSQL DSN once the server has answered a
// ping. A server that cannot be started or reached fails the test when CI
// is set; elsewhere only missing binaries skip it.
func requirePostgres(tb testing.TB) string {
	tb.Helper()
	dsn := postgresDSN()
	return requireServer(tb, "PostgreSQL", "pgx", envPostgresDSN, dsn, servers.pgErr)
}

// requireMySQL is requirePostgres for MariaDB/MySQL.
func requireMySQL(tb testing.TB) string {
	tb.Helper()
	dsn := mysqlDSN()
	return requireServer(tb, "MariaDB/MySQL", "mysql", envMySQLDSN, dsn, servers.myErr)
}

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
	err := func() error {
		db, err := sql.Open(driverName, dsn)
		if err != nil {
			return err
		}
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		return db.PingContext(ctx)
	}()
	if err != nil {
		if ci {
			tb.Fatalf("%s server unreachable (CI is set, so this is a failure): %v; check %s", what, err, env)
		}
		tb.Skipf("%s server unreachable: %v; set %s to a reachable DSN to run this test", what, err, env)
	}
	return dsn
}

// pgTarget is a PostgreSQL server address, re-rendered as a URL or as a
// keyword/value string with extra parameters.
type pgTarget struct {
	host, user, password, database, sslmode string
	port                                    uint16
}

func parsePgTarget(tb testing.TB, dsn string) pgTarget {
	tb.Helper()
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		tb.Fatalf("parse %s: %v", envPostgresDSN, err)
	}
	mode := "disable"
	if cfg.TLSConfig != nil {
		mode = "require"
	}
	return pgTarget{host: cfg.Host, port: cfg.Port, user: cfg.User, password: cfg.Password,
		database: cfg.Database, sslmode: mode}
}

// withPassword returns a copy with another password.
func (p pgTarget) withPassword(pw string) pgTarget { p.password = pw; return p }

// URL renders p as postgres://... with params appended verbatim (each
// "key=value", already escaped as the caller wants it).
func (p pgTarget) URL(params ...string) string {
	u := url.URL{Scheme: "postgres", Host: net.JoinHostPort(p.host, strconv.Itoa(int(p.port))), Path: "/" + p.database}
	if p.password != "" {
		u.User = url.UserPassword(p.user, p.password)
	} else {
		u.User = url.User(p.user)
	}
	return u.String() + "?" + strings.Join(append([]string{"sslmode=" + p.sslmode}, params...), "&")
}

// KV renders p in keyword/value form with params appended verbatim.
func (p pgTarget) KV(params ...string) string {
	parts := []string{
		"host=" + kvQuote(p.host),
		"port=" + strconv.Itoa(int(p.port)),
		"user=" + kvQuote(p.user),
		"dbname=" + kvQuote(p.database),
		"sslmode=" + p.sslmode,
	}
	if p.password != "" {
		parts = append(parts, "password="+kvQuote(p.password))
	}
	return strings.Join(append(parts, params...), " ")
}

func kvQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, ` '\`) {
		return s
	}
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

// mysqlTarget is the MySQL DSN re-rendered with extra parameters.
type mysqlTarget struct{ cfg *mysql.Config }

func parseMySQLTarget(tb testing.TB, dsn string) mysqlTarget {
	tb.Helper()
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		tb.Fatalf("parse %s: %v", envMySQLDSN, err)
	}
	return mysqlTarget{cfg: cfg}
}

func (m mysqlTarget) withPassword(pw string) mysqlTarget {
	c := m.cfg.Clone()
	c.Passwd = pw
	return mysqlTarget{cfg: c}
}

// DSN renders the target with params appended verbatim.
func (m mysqlTarget) DSN(params ...string) string {
	s := m.cfg.FormatDSN()
	if len(params) == 0 {
		return s
	}
	sep := "?"
	if strings.Contains(s, "?") {
		sep = "&"
	}
	return s + sep + strings.Join(params, "&")
}

func init() {
	// go-sql-driver/mysql logs every stale connection it drops at checkout
	// ("closing bad idle connection"); the kill tests drop dozens on purpose.
	_ = mysql.SetLogger(log.New(io.Discard, "", 0))
}

var appSeq atomic.Int64

// uniqueAppName returns an application_name no other test run uses, so a
// test can tell its own PostgreSQL sessions from everyone else's.
func uniqueAppName(tag string) string {
	return fmt.Sprintf("rpg_it_%s_%d_%d", tag, os.Getpid(), appSeq.Add(1))
}

// openDB opens driverName on dsn and closes it at cleanup.
func openDB(tb testing.TB, driverName, dsn string) *sql.DB {
	tb.Helper()
	db, err := sql.Open(driverName, dsn)
	if err != nil {
		tb.Fatalf("sql.Open(%q): %v", driverName, err)
	}
	tb.Cleanup(func() { db.Close() })
	return db
}

// ctxT returns a context bounded by d and cancelled at cleanup.
func ctxT(tb testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	tb.Cleanup(cancel)
	return ctx
}
