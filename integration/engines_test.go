package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// engine hides what differs between PostgreSQL and MariaDB/MySQL in the
// scenarios that are written once: how to open a pool, how a session names
// itself, and how to end sessions of one's own pool from outside.
type engine interface {
	// name is the subtest name.
	name() string
	// require skips or fails the test when the server is unreachable.
	require(t testing.TB)
	// wrapperDriver and bareDriver are the registered driver names.
	wrapperDriver() string
	bareDriver() string
	// open opens a pool with the given driver; extra are DSN keys. The pool
	// is tagged so its sessions can be told from everyone else's.
	open(t testing.TB, driverName string, extra ...string) *pool
	// idQuery returns the current session's id as one integer column.
	idQuery() string
	// killer prepares, from separate admin connections opened now, a
	// function that ends the given sessions of p (only those: ids recorded
	// from p's own connections) and returns once the server no longer
	// lists them. Preparing first keeps connect time out of the kill.
	killer(ctx context.Context, t testing.TB, p *pool, n int) func(ids []int64)
}

type pool struct {
	db  *sql.DB
	tag string // PostgreSQL application_name; "" for MySQL
	// rescue, if not nil, terminates every session of this pool (and only
	// those), so that a read blocked on one of them returns.
	rescue func()
}

// ---- PostgreSQL ----

type pgEngine struct{}

func (pgEngine) name() string                 { return "postgres" }
func (pgEngine) require(t testing.TB)         { requirePostgres(t) }
func (pgEngine) wrapperDriver() string        { return "resilientpg" }
func (pgEngine) bareDriver() string           { return "pgx" }
func (pgEngine) idQuery() string              { return "SELECT pg_backend_pid()" }
func (pgEngine) target(t testing.TB) pgTarget { return parsePgTarget(t, requirePostgres(t)) }

func (e pgEngine) open(t testing.TB, driverName string, extra ...string) *pool {
	tag := uniqueAppName(driverName)
	target := e.target(t)
	db := openDB(t, driverName, target.URL(append([]string{"application_name=" + tag}, extra...)...))
	rescue := func() {
		admin, err := sql.Open("pgx", target.URL("application_name="+uniqueAppName("rescue")))
		if err != nil {
			t.Errorf("rescue: %v", err)
			return
		}
		defer admin.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var n int
		err = admin.QueryRowContext(ctx, `SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
			WHERE application_name = $1 AND pid <> pg_backend_pid()`, tag).Scan(&n)
		t.Logf("rescue: terminated the pool's %d sessions (application_name %s): err=%v", n, tag, err)
	}
	return &pool{db: db, tag: tag, rescue: rescue}
}

// killer terminates only backends that carry both a recorded pid and the
// pool's own application_name. pg_terminate_backend(pid, 5000) waits until
// the backend is gone, polling every 100 ms, so the n calls run in parallel
// on n admin connections: one after another they would take n*100 ms.
func (e pgEngine) killer(ctx context.Context, t testing.TB, p *pool, n int) func(ids []int64) {
	t.Helper()
	admin := openDB(t, "pgx", e.target(t).URL("application_name="+uniqueAppName("admin")))
	admin.SetMaxOpenConns(n)
	admin.SetMaxIdleConns(n)
	conns := make([]*sql.Conn, n)
	for i := range conns {
		c, err := admin.Conn(ctx)
		if err != nil {
			t.Fatalf("admin connection: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		if err := c.PingContext(ctx); err != nil {
			t.Fatalf("admin connection: %v", err)
		}
		conns[i] = c
	}
	return func(ids []int64) {
		t.Helper()
		if len(ids) > len(conns) {
			t.Fatalf("test bug: %d ids for %d admin connections", len(ids), len(conns))
		}
		errs := make([]error, len(ids))
		var wg sync.WaitGroup
		for i, id := range ids {
			wg.Go(func() {
				var gone bool
				err := conns[i].QueryRowContext(ctx,
					`SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
					  WHERE pid = $1 AND application_name = $2 AND pid <> pg_backend_pid()`, id, p.tag).Scan(&gone)
				switch {
				case errors.Is(err, sql.ErrNoRows):
					errs[i] = fmt.Errorf("backend %d with application_name %s not found", id, p.tag)
				case err != nil:
					errs[i] = fmt.Errorf("pg_terminate_backend(%d, 5000): %w", id, err)
				case !gone:
					errs[i] = fmt.Errorf("pg_terminate_backend(%d, 5000) = false: backend not gone within 5 s", id)
				}
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	}
}

// ---- MariaDB / MySQL ----

type mysqlEngine struct{}

func (mysqlEngine) name() string          { return "mysql" }
func (mysqlEngine) require(t testing.TB)  { requireMySQL(t) }
func (mysqlEngine) wrapperDriver() string { return "resilientmysql" }
func (mysqlEngine) bareDriver() string    { return "mysql" }
func (mysqlEngine) idQuery() string       { return "SELECT CONNECTION_ID()" }
func (mysqlEngine) target(t testing.TB) mysqlTarget {
	return parseMySQLTarget(t, requireMySQL(t))
}

func (e mysqlEngine) open(t testing.TB, driverName string, extra ...string) *pool {
	return &pool{db: openDB(t, driverName, e.target(t).DSN(extra...))}
}

// killer runs KILL for each recorded connection id (the server never
// reuses an id, so these are ours) on one admin connection, then polls the
// processlist until they are gone, for at most 5 s.
func (e mysqlEngine) killer(ctx context.Context, t testing.TB, _ *pool, _ int) func(ids []int64) {
	t.Helper()
	admin := openDB(t, "mysql", e.target(t).DSN())
	admin.SetMaxOpenConns(1)
	conn, err := admin.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var self int64
	if err := conn.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&self); err != nil {
		t.Fatal(err)
	}
	return func(ids []int64) {
		t.Helper()
		list := make([]string, len(ids))
		for i, id := range ids {
			if id == self {
				t.Fatalf("test bug: admin connection %d is among the ids to kill", id)
			}
			list[i] = fmt.Sprint(id)
			if _, err := conn.ExecContext(ctx, fmt.Sprintf("KILL CONNECTION %d", id)); err != nil {
				t.Fatalf("KILL %d: %v", id, err)
			}
		}
		q := "SELECT COUNT(*) FROM information_schema.processlist WHERE ID IN (" + strings.Join(list, ",") + ")"
		deadline := time.Now().Add(5 * time.Second)
		for {
			var n int
			if err := conn.QueryRowContext(ctx, q).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d killed connections still in the processlist after 5 s", n, len(ids))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func allEngines() []engine { return []engine{pgEngine{}, mysqlEngine{}} }
