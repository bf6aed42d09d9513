package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// scEngine is one database engine of the scenario table: its drivers and
// the SQL that differs between PostgreSQL and MariaDB.
type scEngine struct {
	name          string // subtest and table name
	wrapper, bare string // registered driver names
	pg            bool
}

var scEngines = []scEngine{
	{name: "postgres", wrapper: "resilientpg", bare: "pgx", pg: true},
	{name: "mariadb", wrapper: "resilientmysql", bare: "mysql"},
}

// idQuery returns the session's server-side id as one integer.
func (e scEngine) idQuery() string {
	if e.pg {
		return "SELECT pg_backend_pid()"
	}
	return "SELECT CONNECTION_ID()"
}

// insertSQL inserts one row with a client-generated id into table.
func (e scEngine) insertSQL(table string) string {
	if e.pg {
		return "INSERT INTO " + table + " (id) VALUES ($1)"
	}
	return "INSERT INTO " + table + " (id) VALUES (?)"
}

// scServer is a throwaway server of its own for one scenario, so that
// restarts, outages and configuration changes never touch the shared
// servers the other tests of the package use (helpers_test.go). Clients
// reach it through faultlab proxies; admin work goes direct.
type scServer struct {
	e     scEngine
	pg    *faultlab.Postgres
	my    *faultlab.MariaDB
	admin *sql.DB          // direct, bare driver, one connection
	probe driver.Connector // direct, bare driver: one fresh session per Connect
}

// startScServer starts the engine's server and registers its removal. A
// server that cannot start goes through requireServer, the package's CI
// policy: with CI set it fails the test, elsewhere missing binaries skip it.
//
// Both servers are made crash-safe for commits, which faultlab's speed
// defaults are not: PostgreSQL with synchronous_commit=on (fsync stays off:
// the OS keeps what a killed process wrote), MariaDB with
// innodb_flush_log_at_trx_commit=2 (written to the OS at every commit).
// Otherwise StopImmediate would lose acknowledged commits by configuration,
// and the write-safety scenarios would measure the server, not the client.
func startScServer(t *testing.T, e scEngine) *scServer {
	t.Helper()
	return startScServerIn(t, e, nil)
}

// startScServerIn is startScServer with the server inside ns (nil: on
// 127.0.0.1). Inside a namespace the admin connection uses the unix
// socket, so that no injected network fault reaches it.
func startScServerIn(t *testing.T, e scEngine, ns *faultlab.Netns) *scServer {
	t.Helper()
	return startScServerWith(t, e, ns, nil, nil)
}

// startScServerWith is startScServerIn with extra PostgreSQL settings or
// mariadbd arguments (for example a lower max_connections).
func startScServerWith(t *testing.T, e scEngine, ns *faultlab.Netns, pgConf map[string]string, myArgs []string) *scServer {
	t.Helper()
	conf := map[string]string{"synchronous_commit": "on"}
	for k, v := range pgConf {
		conf[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := &scServer{e: e}
	var err error
	dsn, adminDSN := "", ""
	if e.pg {
		s.pg, err = faultlab.StartPostgres(ctx, faultlab.PostgresOptions{
			ExtraConf: conf,
			Logf:      t.Logf,
			Netns:     ns,
		})
		if err == nil {
			t.Cleanup(func() { s.pg.Close() })
			dsn, adminDSN = s.dsn(s.addr()), s.dsn(s.addr())
			if ns != nil {
				adminDSN = s.pg.SocketDSN("test")
			}
		}
		requireServer(t, "PostgreSQL", e.bare, envPostgresDSN, dsn, err)
	} else {
		s.my, err = faultlab.StartMariaDB(ctx, faultlab.MariaDBOptions{
			ExtraArgs: append([]string{"--innodb-flush-log-at-trx-commit=2"}, myArgs...),
			Logf:      t.Logf,
			Netns:     ns,
		})
		if err == nil {
			t.Cleanup(func() { s.my.Close() })
			dsn, adminDSN = s.dsn(s.addr()), s.dsn(s.addr())
			if ns != nil {
				adminDSN = s.my.SocketDSN("test")
			}
		}
		requireServer(t, "MariaDB", e.bare, envMySQLDSN, dsn, err)
	}
	s.admin, err = sql.Open(e.bare, adminDSN)
	if err != nil {
		t.Fatal(err)
	}
	s.admin.SetMaxOpenConns(1)
	t.Cleanup(func() { s.admin.Close() })
	dc, ok := s.admin.Driver().(driver.DriverContext)
	if !ok {
		t.Fatalf("driver %s has no OpenConnector", e.bare)
	}
	if s.probe, err = dc.OpenConnector(dsn); err != nil {
		t.Fatal(err)
	}
	return s
}

// addr is the server's own address (proxies forward here).
func (s *scServer) addr() string {
	if s.pg != nil {
		return s.pg.Addr()
	}
	return s.my.Addr()
}

// dsn is a client DSN for database test at addr (a proxy or the server),
// with extra keys appended.
func (s *scServer) dsn(addr string, extra ...string) string {
	if s.e.pg {
		return fmt.Sprintf("postgres://postgres@%s/test?%s", addr,
			strings.Join(append([]string{"sslmode=disable"}, extra...), "&"))
	}
	d := fmt.Sprintf("root@tcp(%s)/test", addr)
	if len(extra) > 0 {
		d += "?" + strings.Join(extra, "&")
	}
	return d
}

func (s *scServer) stop(mode faultlab.StopMode) error {
	if s.pg != nil {
		return s.pg.Stop(mode)
	}
	return s.my.Stop(mode)
}

func (s *scServer) start(ctx context.Context) error {
	if s.pg != nil {
		return s.pg.Start(ctx)
	}
	return s.my.Start(ctx)
}

func (s *scServer) restart(ctx context.Context, mode faultlab.StopMode) error {
	if s.pg != nil {
		return s.pg.Restart(ctx, mode)
	}
	return s.my.Restart(ctx, mode)
}

// exec runs one statement on the admin connection.
func (s *scServer) exec(ctx context.Context, t testing.TB, q string) {
	t.Helper()
	if _, err := s.admin.ExecContext(ctx, q); err != nil {
		t.Fatalf("admin %q: %v", q, err)
	}
}

// probeOnce opens one fresh session directly (no proxy) and closes it: nil
// means the server accepts sessions.
func (s *scServer) probeOnce(ctx context.Context) error {
	c, err := s.probe.Connect(ctx)
	if err != nil {
		return err
	}
	return c.Close()
}

// upMark is when the session that showed the server back began, relative
// to a t0, and how long it took to get in: at+connect is when it got in
// (see scFault.settleIn).
type upMark struct {
	at      time.Duration // -1 if the server did not come back
	connect time.Duration
}

// watchUp probes the server directly every 10 ms, from now until a probe
// succeeds, and delivers the start of the first successful probe relative
// to t0, measured independently of the pools (faultlab's Start returns a
// little later), with the time that probe took to get in: a freshly
// started server opens its first sessions slowly (each a forked process
// that rebuilds the catalog cache), and no client can succeed sooner. It
// delivers at -1 if the server did not come back within 90 s
// or ctx ended.
func (s *scServer) watchUp(ctx context.Context, t0 time.Time) <-chan upMark {
	ch := make(chan upMark, 1)
	go func() {
		deadline := time.Now().Add(90 * time.Second)
		for i := 0; i < 9000 && time.Now().Before(deadline) && ctx.Err() == nil; i++ {
			at := time.Since(t0)
			pctx, cancel := context.WithTimeout(ctx, time.Second)
			err := s.probeOnce(pctx)
			cancel()
			if err == nil {
				ch <- upMark{at: at, connect: time.Since(t0) - at}
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		ch <- upMark{at: -1}
	}()
	return ch
}

// awaitUp waits for watchUp's mark (95 s at most) and returns when the
// session that showed the server back began, and how long it took to get
// in. A mark after startEnd, or none, gives startEnd: faultlab's Start
// returns only once a session could be opened.
func awaitUp(ch <-chan upMark, startEnd time.Duration) (at, connect time.Duration) {
	m := upMark{at: -1}
	select {
	case m = <-ch:
	case <-time.After(95 * time.Second):
	}
	if m.at < 0 || m.at > startEnd {
		return startEnd, m.connect
	}
	return m.at, m.connect
}

// killAll ends every client session except the admin connection's own and
// returns once the server no longer lists them, without the 100 ms per
// session that faultlab's waiting pg_terminate_backend(pid, 5000) costs:
// the "used just before" scenario must finish the kill well within the
// 1 s ping-idle threshold.
func (s *scServer) killAll(ctx context.Context, t testing.TB) int {
	t.Helper()
	return s.killWhere(ctx, t,
		"backend_type = 'client backend' AND pid <> pg_backend_pid()",
		"ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Killed') AND USER NOT IN ('system user', 'event_scheduler')")
}

// killWhere ends the sessions that pgWhere (over pg_stat_activity) or
// myWhere (over information_schema.PROCESSLIST) select, and returns how
// many once the server no longer lists them (at most 5 s).
func (s *scServer) killWhere(ctx context.Context, t testing.TB, pgWhere, myWhere string) int {
	t.Helper()
	conn, err := s.admin.Conn(ctx) // pinned, so the session spared is this one
	if err != nil {
		t.Fatalf("admin connection: %v", err)
	}
	defer conn.Close()
	var ids []string
	if s.e.pg {
		ids = queryIDs(ctx, t, conn, `WITH v AS MATERIALIZED (
				SELECT pid FROM pg_stat_activity WHERE `+pgWhere+`)
			SELECT pid FROM v WHERE pg_terminate_backend(pid)`)
	} else {
		ids = queryIDs(ctx, t, conn, "SELECT ID FROM information_schema.PROCESSLIST WHERE "+myWhere)
		for _, id := range ids {
			_, err := conn.ExecContext(ctx, "KILL CONNECTION "+id)
			if me := (*mysql.MySQLError)(nil); errors.As(err, &me) && me.Number == 1094 {
				continue // ended on its own meanwhile
			}
			if err != nil {
				t.Fatalf("KILL %s: %v", id, err)
			}
		}
	}
	if len(ids) == 0 {
		return 0
	}
	q := "SELECT count(*) FROM pg_stat_activity WHERE pid IN (" + strings.Join(ids, ",") + ")"
	if !s.e.pg {
		q = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN (" + strings.Join(ids, ",") + ")"
	}
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; ; i++ {
		var left int
		if err := conn.QueryRowContext(ctx, q).Scan(&left); err != nil {
			t.Fatalf("waiting for killed sessions: %v", err)
		}
		if left == 0 {
			return len(ids)
		}
		if i >= 1000 || time.Now().After(deadline) {
			t.Fatalf("%d of %d killed sessions still listed after 5 s", left, len(ids))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func queryIDs(ctx context.Context, t testing.TB, conn *sql.Conn, q string) []string {
	t.Helper()
	rows, err := conn.QueryContext(ctx, q)
	if err != nil {
		t.Fatalf("list sessions: %v", err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatalf("list sessions: %v", err)
		}
		ids = append(ids, strconv.FormatInt(id, 10))
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("list sessions: %v", err)
	}
	return ids
}

// clientSessions counts the client sessions other than the admin
// connection's own.
func (s *scServer) clientSessions(ctx context.Context, t testing.TB) int {
	t.Helper()
	q := "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
	if !s.e.pg {
		q = `SELECT COUNT(*) FROM information_schema.PROCESSLIST
			WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Killed')
			AND USER NOT IN ('system user', 'event_scheduler')`
	}
	var n int
	if err := s.admin.QueryRowContext(ctx, q).Scan(&n); err != nil {
		t.Fatalf("count sessions: %v", err)
	}
	return n
}

// setIdleTimeout makes the server end sessions idle longer than one
// second, for sessions opened from now on (PostgreSQL: also those already
// open): PostgreSQL's idle_session_timeout via ALTER SYSTEM and a reload,
// MariaDB's global wait_timeout. It returns once a new session sees it.
func (s *scServer) setIdleTimeout(ctx context.Context, t testing.TB) {
	t.Helper()
	check := "SELECT @@session.wait_timeout"
	want := "1"
	if s.e.pg {
		if err := s.pg.Exec(ctx, "ALTER SYSTEM SET idle_session_timeout = '1s'"); err != nil {
			t.Fatal(err)
		}
		if err := s.pg.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
			t.Fatal(err)
		}
		check, want = "SHOW idle_session_timeout", "1s"
	} else {
		s.exec(ctx, t, "SET GLOBAL wait_timeout = 1")
	}
	// A pool without idle connections opens a new session for each query.
	db, err := sql.Open(s.e.bare, s.dsn(s.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxIdleConns(0)
	for i := 0; ; i++ {
		var got string
		err := db.QueryRowContext(ctx, check).Scan(&got)
		if err == nil && got == want {
			return
		}
		if i >= 200 {
			t.Fatalf("%s = %q (err %v) after 200 tries, want %q", check, got, err, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// createTable creates a table of client-generated ids with no unique
// constraint, so that a write executed twice shows up as a duplicate.
func (s *scServer) createTable(ctx context.Context, t testing.TB, name string) {
	t.Helper()
	q := "CREATE TABLE " + name + " (id bigint NOT NULL)"
	if !s.e.pg {
		q += " ENGINE=InnoDB"
	}
	s.exec(ctx, t, q)
}

// rowIDs returns how many rows carry each id in table.
func rowIDs(ctx context.Context, t testing.TB, db *sql.DB, table string) map[int64]int {
	t.Helper()
	rows, err := db.QueryContext(ctx, "SELECT id FROM "+table)
	if err != nil {
		t.Fatalf("read %s: %v", table, err)
	}
	defer rows.Close()
	got := map[int64]int{}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatalf("read %s: %v", table, err)
		}
		got[id]++
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read %s: %v", table, err)
	}
	return got
}
