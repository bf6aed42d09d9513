// Package killtest is the real-server scenarios the exporter modules share:
// throwaway PostgreSQL and MariaDB servers (or the ones the environment
// names), and pools of 10 that meet a known fault (every session killed
// from the server side, a server restart, every connection black-holed;
// see Faults), so that the wrapper's counters have known values to read
// back.
package killtest

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
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

const (
	envPostgresDSN = "RESILIENTPG_TEST_POSTGRES_DSN"
	envMySQLDSN    = "RESILIENTPG_TEST_MYSQL_DSN"
	// PoolSize is the scenario's pool size, and so its number of discards.
	PoolSize = 10
)

// servers are started once per test binary, on first use.
var servers struct {
	pgOnce, myOnce sync.Once
	pg             *faultlab.Postgres
	my             *faultlab.MariaDB
	pgDSN, myDSN   string
	pgErr, myErr   error

	// Servers started for the faults when the environment names the
	// servers above, which cannot be restarted from here (faults.go).
	pgOwnOnce, myOwnOnce sync.Once
	pgOwn                *faultlab.Postgres
	myOwn                *faultlab.MariaDB
	pgOwnErr, myOwnErr   error
}

// Main is the test binary's TestMain: it runs the tests, then removes the
// servers it started.
func Main(m *testing.M) {
	// go-sql-driver/mysql logs each dead connection it drops at checkout;
	// the kill test drops ten on purpose.
	_ = mysql.SetLogger(log.New(io.Discard, "", 0))
	code := m.Run()
	if servers.pg != nil {
		servers.pg.Close()
	}
	if servers.my != nil {
		servers.my.Close()
	}
	if servers.pgOwn != nil {
		servers.pgOwn.Close()
	}
	if servers.myOwn != nil {
		servers.myOwn.Close()
	}
	os.Exit(code)
}

// Target is a server under test and how to end the sessions of one pool.
type Target struct {
	Driver  string // resilientpg or resilientmysql
	DSN     string
	idQuery string // the session's id on the server
	// kill ends the sessions ids (all of them the test's own) and returns
	// once the server no longer has them.
	kill func(ctx context.Context, t *testing.T, ids []int64)
}

// Postgres returns the PostgreSQL target. On the throwaway server every
// client session is the test's, so faultlab's KillSessions ends them all;
// on a server the environment names only sessions with both a recorded pid
// and the pool's own application_name are ended.
func Postgres(t *testing.T) Target {
	servers.pgOnce.Do(func() {
		if servers.pgDSN = os.Getenv(envPostgresDSN); servers.pgDSN != "" {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if servers.pg, servers.pgErr = faultlab.StartPostgres(ctx, faultlab.PostgresOptions{}); servers.pgErr == nil {
			servers.pgDSN = servers.pg.DSN("test")
		}
	})
	require(t, "PostgreSQL", envPostgresDSN, "resilientpg", servers.pgDSN, servers.pgErr)
	app := fmt.Sprintf("resilientpg_killtest_%d_%d", os.Getpid(), time.Now().UnixNano())
	sep := " "
	if strings.Contains(servers.pgDSN, "://") {
		sep = "?"
		if strings.Contains(servers.pgDSN, "?") {
			sep = "&"
		}
	}
	tg := Target{Driver: "resilientpg", DSN: servers.pgDSN + sep + "application_name=" + app, idQuery: "SELECT pg_backend_pid()"}
	tg.kill = func(ctx context.Context, t *testing.T, ids []int64) {
		if servers.pg != nil {
			n, err := servers.pg.KillSessions(ctx)
			if err != nil || n < len(ids) {
				t.Fatalf("KillSessions: %d ended, err %v; want at least %d", n, err, len(ids))
			}
			return
		}
		// pg_terminate_backend(pid, 5000) returns once the backend is gone.
		q := `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
			WHERE application_name = $1 AND pid IN (` + joinIDs(ids) + `) AND pid <> pg_backend_pid()`
		var n int
		if err := admin(t, "resilientpg", servers.pgDSN).QueryRowContext(ctx, q, app).Scan(&n); err != nil || n != len(ids) {
			t.Fatalf("terminate the pool's backends: %d ended, err %v; want %d", n, err, len(ids))
		}
	}
	return tg
}

// MariaDB returns the MariaDB/MySQL target; with a server the environment
// names, it kills the recorded connection ids only (the server never
// reuses one).
func MariaDB(t *testing.T) Target {
	servers.myOnce.Do(func() {
		if servers.myDSN = os.Getenv(envMySQLDSN); servers.myDSN != "" {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if servers.my, servers.myErr = faultlab.StartMariaDB(ctx, faultlab.MariaDBOptions{}); servers.myErr == nil {
			servers.myDSN = servers.my.DSN("test")
		}
	})
	require(t, "MariaDB/MySQL", envMySQLDSN, "resilientmysql", servers.myDSN, servers.myErr)
	tg := Target{Driver: "resilientmysql", DSN: servers.myDSN, idQuery: "SELECT CONNECTION_ID()"}
	tg.kill = func(ctx context.Context, t *testing.T, ids []int64) {
		if servers.my != nil {
			n, err := servers.my.KillSessions(ctx)
			if err != nil || n < len(ids) {
				t.Fatalf("KillSessions: %d killed, err %v; want at least %d", n, err, len(ids))
			}
			return
		}
		db := admin(t, "resilientmysql", servers.myDSN)
		for _, id := range ids {
			if _, err := db.ExecContext(ctx, fmt.Sprintf("KILL CONNECTION %d", id)); err != nil {
				t.Fatalf("KILL %d: %v", id, err)
			}
		}
		// KILL only flags the thread; wait until it has left.
		q := "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN (" + joinIDs(ids) + ")"
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			var left int
			if err := db.QueryRowContext(ctx, q).Scan(&left); err != nil || left == 0 {
				if err != nil {
					t.Fatalf("processlist: %v", err)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d killed sessions still listed after 5 s", left)
			}
		}
	}
	return tg
}

// require fails the test if its server could not be started or reached
// while CI is set; elsewhere it skips it when the server binaries are
// missing or the server the environment names does not answer.
func require(t *testing.T, what, env, driverName, dsn string, startErr error) {
	t.Helper()
	ci := os.Getenv("CI") != ""
	switch {
	case startErr == nil:
	case ci:
		t.Fatalf("throwaway %s server did not start (CI is set, so this is a failure): %v", what, startErr)
	case errors.Is(startErr, faultlab.ErrNotInstalled):
		t.Skipf("no %s server: %v; install it (bash .ci/setup) or set %s", what, startErr, env)
	default:
		t.Fatalf("throwaway %s server did not start: %v", what, startErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := admin(t, driverName, dsn).PingContext(ctx); err != nil {
		if ci {
			t.Fatalf("%s server unreachable (CI is set, so this is a failure): %v; check %s", what, err, env)
		}
		t.Skipf("%s server unreachable: %v; set %s to a reachable DSN to run this test", what, err, env)
	}
}

// admin opens a one-connection pool for killing sessions, closed at cleanup.
func admin(t *testing.T, driverName, dsn string) *sql.DB {
	db, err := sql.Open(driverName, dsn)
	if err != nil {
		t.Fatalf("admin pool: %v", err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	return db
}

// Scenario opens a pool of 10 on tg, fills it, kills every pooled
// session from the server side, and after 100 ms checks 10 connections out
// at once again with one query each. Holding all 10 until every query has
// answered makes database/sql take each dead connection from the pool
// before it hands out a new one, so each is discarded exactly once. It
// returns the pool, closed at cleanup.
func Scenario(t *testing.T, tg Target) *sql.DB {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := resilientpg.Open(tg.Driver, tg.DSN)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(PoolSize)
	db.SetMaxIdleConns(PoolSize)

	killed, errs := holdAll(ctx, db, tg.idQuery)
	if len(errs) != 0 || len(killed) != PoolSize {
		t.Fatalf("filling the pool: %d distinct sessions, errors %v; want %d, none", len(killed), errs, PoolSize)
	}
	ids := make([]int64, 0, PoolSize)
	for id := range killed {
		ids = append(ids, id)
	}
	start := time.Now()
	tg.kill(ctx, t, ids)
	t.Logf("killed the %d pooled sessions in %v", len(ids), time.Since(start).Round(time.Millisecond))
	time.Sleep(100 * time.Millisecond)

	again, errs := holdAll(ctx, db, tg.idQuery)
	if len(errs) != 0 {
		t.Errorf("%d of %d queries after the kill failed, want 0: %v", len(errs), PoolSize, errs)
	}
	for id := range again {
		if killed[id] {
			t.Errorf("a query was answered by killed session %d", id)
		}
	}
	return db
}

// holdAll checks out PoolSize connections concurrently, runs idQuery on
// each, and returns them once all have answered: the session ids seen and
// the errors.
func holdAll(ctx context.Context, db *sql.DB, idQuery string) (map[int64]bool, []error) {
	var (
		mu   sync.Mutex
		ids  = map[int64]bool{}
		errs []error
		all  sync.WaitGroup
		done = make(chan struct{})
		out  sync.WaitGroup
	)
	all.Add(PoolSize)
	for range PoolSize {
		out.Go(func() {
			var id int64
			c, err := db.Conn(ctx)
			if err == nil {
				defer c.Close()
				err = c.QueryRowContext(ctx, idQuery).Scan(&id)
			}
			mu.Lock()
			if err != nil {
				errs = append(errs, err)
			} else {
				ids[id] = true
			}
			mu.Unlock()
			all.Done()
			<-done // hold the connection until every query has answered
		})
	}
	all.Wait()
	close(done)
	out.Wait()
	return ids, errs
}

func joinIDs(ids []int64) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	return strings.Join(s, ",")
}

// CheckDiscards asserts the wrapper's exact account of Scenario: the first
// checkout finds every idle session ended at once and retires the pool (one
// invalidation, cause shutdown), so each of the PoolSize connections is
// discarded once, as invalidated.
func CheckDiscards(t *testing.T, s resilientpg.Stats) {
	t.Helper()
	if s.Discards[resilientpg.DiscardInvalidated] != PoolSize || s.Discards.Total() != PoolSize {
		t.Errorf("Stats.Discards = %v, want exactly %d, all invalidated", s.Discards, PoolSize)
	}
	if s.Invalidations[resilientpg.InvalidShutdown] != 1 || s.Invalidations.Total() != 1 {
		t.Errorf("Stats.Invalidations = %v, want exactly one, cause shutdown", s.Invalidations)
	}
}
