package killtest

import (
	"context"
	"database/sql"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// Engine is one database engine of the shared scenarios.
type Engine struct {
	Name   string
	Target func(*testing.T) Target // the server the environment names, or the throwaway one

	driver  string
	idQuery string
	// own returns a server this test binary started, so that it can be
	// restarted or put behind a proxy: the throwaway one, or, when the
	// environment names a server, one more started for these faults.
	own func(*testing.T) server
}

// Engines are the two engines every exporter reads the faults back from.
var Engines = []Engine{
	{Name: "postgres", Target: Postgres, driver: "resilientpg", idQuery: "SELECT pg_backend_pid()", own: ownPostgres},
	{Name: "mariadb", Target: MariaDB, driver: "resilientmysql", idQuery: "SELECT CONNECTION_ID()", own: ownMariaDB},
}

// server is what the faults need of a faultlab server.
type server interface {
	Addr() string
	DSN(db string) string
	Restart(ctx context.Context, mode faultlab.StopMode) error
}

// Fault is one real-server scenario and the wrapper's exact account of
// it. The exporters' tests run each, then read the same counts back
// through their own metrics (CheckExported), so one definition holds the
// expected numbers for the core, Prometheus and OpenTelemetry alike.
type Fault struct {
	Name string
	// Run opens a pool of PoolSize on the engine, causes the fault, runs
	// PoolSize concurrent checkouts with one query each, and returns the
	// pool, closed at cleanup.
	Run func(t *testing.T, e Engine) *sql.DB
	// Exact counts by label (DiscardLabels, CauseLabels); a label not
	// listed must be 0.
	Discards      map[string]int64
	Invalidations map[string]int64
	Pings         int64 // checkout pings
	PingFailures  int64
}

// BlackHolePingTimeout is the checkout ping's bound in the black-hole
// fault: each black-holed connection costs one of these.
const BlackHolePingTimeout = 300 * time.Millisecond

// Faults are the scenarios with known counts:
//   - killed: every pooled session ended from the server side right after
//     use: the first checkout finds them all closed and retires the pool
//     (one invalidation, cause shutdown), so all 10 are discarded as
//     invalidated, none pinged;
//   - restart: a fast restart of the server under an idle pool of 10: the
//     same, one invalidation and 10 invalidated discards;
//   - black-hole: the 10 pooled connections black-holed by a proxy between
//     the pool and the server (no FIN, no RST, nothing comes back), with
//     resilient_ping=always: only the checkout ping can tell, and it fails
//     on each of the 10 (10 ping_failed), retiring nothing pool-wide.
var Faults = []Fault{
	{Name: "killed", Run: func(t *testing.T, e Engine) *sql.DB { return Scenario(t, e.Target(t)) },
		Discards: map[string]int64{"invalidated": PoolSize}, Invalidations: map[string]int64{"shutdown": 1}},
	{Name: "restart", Run: runRestart,
		Discards: map[string]int64{"invalidated": PoolSize}, Invalidations: map[string]int64{"shutdown": 1}},
	{Name: "black-hole", Run: runBlackHole,
		Discards: map[string]int64{"ping_failed": PoolSize}, Pings: PoolSize, PingFailures: PoolSize},
}

// Check asserts the wrapper's own account of the fault, exactly.
func (f Fault) Check(t *testing.T, s resilientpg.Stats) {
	t.Helper()
	for i, label := range DiscardLabels {
		if got, want := s.Discards[i], f.Discards[label]; got != want {
			t.Errorf("%s: Stats.Discards[%s] = %d, want %d (all: %v)", f.Name, label, got, want, s.Discards)
		}
	}
	for i, label := range CauseLabels {
		if got, want := s.Invalidations[i], f.Invalidations[label]; got != want {
			t.Errorf("%s: Stats.Invalidations[%s] = %d, want %d (all: %v)", f.Name, label, got, want, s.Invalidations)
		}
	}
	if s.Pings != f.Pings || s.PingFailures != f.PingFailures {
		t.Errorf("%s: Stats pings %d, ping failures %d; want %d and %d", f.Name, s.Pings, s.PingFailures, f.Pings, f.PingFailures)
	}
}

// Series names the metrics CheckExported reads; an exporter's test maps
// each to its own series.
const (
	SeriesDiscards      = "discards"      // by reason
	SeriesInvalidations = "invalidations" // by cause
	SeriesPings         = "pings"
	SeriesPingFailures  = "ping_failures"
)

// CheckExported asserts the fault's exact counts as an exporter reports
// them. read returns the value of one series (label is "" for the
// unlabelled ones) and whether the exporter has it; a missing series is a
// failure, so an exporter that drops one cannot pass.
func (f Fault) CheckExported(t *testing.T, exporter string, read func(series, label string) (float64, bool)) {
	t.Helper()
	check := func(series, label string, want int64) {
		t.Helper()
		got, ok := read(series, label)
		switch {
		case !ok:
			t.Errorf("%s: %s: no %s series %q", f.Name, exporter, series, label)
		case got != float64(want):
			t.Errorf("%s: %s: %s{%s} = %v, want %d", f.Name, exporter, series, label, got, want)
		}
	}
	var discards, invalidations int64
	for _, label := range DiscardLabels {
		check(SeriesDiscards, label, f.Discards[label])
		discards += f.Discards[label]
	}
	for _, label := range CauseLabels {
		check(SeriesInvalidations, label, f.Invalidations[label])
		invalidations += f.Invalidations[label]
	}
	check(SeriesPings, "", f.Pings)
	check(SeriesPingFailures, "", f.PingFailures)
	// The expected maps must name labels the exporters know, or a typo
	// would make an expected count silently 0.
	if sum(f.Discards) != discards || sum(f.Invalidations) != invalidations {
		t.Fatalf("%s: the fault's expected counts name an unknown label: %v, %v", f.Name, f.Discards, f.Invalidations)
	}
}

func sum(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// openPool opens a pool of PoolSize with the package's Open, closed at
// cleanup.
func openPool(t *testing.T, driverName, dsn string) *sql.DB {
	t.Helper()
	db, err := resilientpg.Open(driverName, dsn)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(PoolSize)
	db.SetMaxIdleConns(PoolSize)
	return db
}

// fill checks out all PoolSize connections at once, so the pool then holds
// PoolSize used, idle ones.
func fill(ctx context.Context, t *testing.T, db *sql.DB, idQuery string) {
	t.Helper()
	if ids, errs := holdAll(ctx, db, idQuery); len(errs) != 0 || len(ids) != PoolSize {
		t.Fatalf("filling the pool: %d distinct sessions, errors %v; want %d, none", len(ids), errs, PoolSize)
	}
}

// runRestart restarts the server (fast: sessions are ended, then the
// server comes back on the same port) under an idle pool of PoolSize.
func runRestart(t *testing.T, e Engine) *sql.DB {
	srv := e.own(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db := openPool(t, e.driver, srv.DSN("test"))
	fill(ctx, t, db, e.idQuery)
	start := time.Now()
	if err := srv.Restart(ctx, faultlab.StopFast); err != nil {
		t.Fatalf("restart: %v", err)
	}
	t.Logf("fast restart took %v", time.Since(start).Round(time.Millisecond))
	if _, errs := holdAll(ctx, db, e.idQuery); len(errs) != 0 {
		t.Errorf("%d of %d queries after the restart failed, want 0: %v", len(errs), PoolSize, errs)
	}
	return db
}

// runBlackHole puts a faultlab proxy between a pool of PoolSize and the
// server, black-holes every pooled connection, and checks PoolSize out
// again with the checkout ping on every checkout.
func runBlackHole(t *testing.T, e Engine) *sql.DB {
	srv := e.own(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := faultlab.NewProxy(srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() }) // registered before the pool's, so it runs after
	db := openPool(t, e.driver, dsnAt(srv, p.Addr(),
		"resilient_ping=always", "resilient_ping_timeout="+BlackHolePingTimeout.String()))
	fill(ctx, t, db, e.idQuery)
	if n := p.BlackholeAll(); n != PoolSize {
		t.Fatalf("precondition: %d connections black-holed, want %d", n, PoolSize)
	}
	start := time.Now()
	if _, errs := holdAll(ctx, db, e.idQuery); len(errs) != 0 {
		t.Errorf("%d of %d queries after the black hole failed, want 0: %v", len(errs), PoolSize, errs)
	}
	t.Logf("%d black-holed connections replaced in %v", PoolSize, time.Since(start).Round(time.Millisecond))
	return db
}

// dsnAt is srv's DSN for database test, pointed at addr (a proxy), with
// extra keys.
func dsnAt(srv server, addr string, keys ...string) string {
	d := strings.Replace(srv.DSN("test"), srv.Addr(), addr, 1)
	if len(keys) == 0 {
		return d
	}
	sep := "?"
	if strings.Contains(d, "?") {
		sep = "&"
	}
	return d + sep + strings.Join(keys, "&")
}

// ownPostgres is a PostgreSQL server this binary started: the throwaway
// one of Postgres, or, when the environment names a server (which cannot
// be restarted from here), one more.
func ownPostgres(t *testing.T) server {
	t.Helper()
	if os.Getenv(envPostgresDSN) == "" {
		Postgres(t) // starts the throwaway server, or fails or skips as require says
		return servers.pg
	}
	servers.pgOwnOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		servers.pgOwn, servers.pgOwnErr = faultlab.StartPostgres(ctx, faultlab.PostgresOptions{})
	})
	dsn := ""
	if servers.pgOwnErr == nil {
		dsn = servers.pgOwn.DSN("test")
	}
	require(t, "PostgreSQL (to fault)", "no variable: this fault restarts its own server", "resilientpg", dsn, servers.pgOwnErr)
	return servers.pgOwn
}

// ownMariaDB is ownPostgres for MariaDB.
func ownMariaDB(t *testing.T) server {
	t.Helper()
	if os.Getenv(envMySQLDSN) == "" {
		MariaDB(t)
		return servers.my
	}
	servers.myOwnOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		servers.myOwn, servers.myOwnErr = faultlab.StartMariaDB(ctx, faultlab.MariaDBOptions{})
	})
	dsn := ""
	if servers.myOwnErr == nil {
		dsn = servers.myOwn.DSN("test")
	}
	require(t, "MariaDB (to fault)", "no variable: this fault restarts its own server", "resilientmysql", dsn, servers.myOwnErr)
	return servers.myOwn
}
