package integration

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// haLoginRetry is server_login_retry in these scenarios (PgBouncer's
// default is 15 s): short enough that a caller with a 5 s deadline can
// outwait it, so "callers wait instead of failing" is a fair goal.
const haLoginRetry = 2 * time.Second

// haTxMode is the pgx query mode used under transaction pooling: the
// default, cache_statement, fails on PgBouncer 1.18 (see
// TestPgBouncerQueryModes).
const haTxMode = "default_query_exec_mode=cache_describe"

// startBouncer starts PostgreSQL (the scenario table's, commits
// crash-safe) with PgBouncer in front, in pool mode mode, and creates the
// write table.
func startBouncer(t *testing.T, mode string, settings map[string]string) (*scServer, *faultlab.PgBouncer) {
	t.Helper()
	srv := startScServer(t, haPG)
	s := map[string]string{"server_login_retry": fmt.Sprint(int(haLoginRetry.Seconds()))}
	maps.Copy(s, settings)
	b, err := faultlab.StartPgBouncer(topoCtx(t), faultlab.PgBouncerOptions{
		Target: srv.addr(), PoolMode: mode, Settings: s, Logf: t.Logf})
	requireTopology(t, "PgBouncer", err)
	t.Cleanup(func() { b.Close() })
	srv.exec(topoCtx(t), t, haPG.haCreateSQL())
	return srv, b
}

// bouncerPools opens the wrapper's and the bare driver's pools, each
// through its own faultlab proxy to PgBouncer, so that each proxy's accept
// count is its pool's connects.
func (env *scEnv) bouncerPools(b *faultlab.PgBouncer, params string) []*scPool {
	env.t.Helper()
	return []*scPool{env.bouncerPool(b, params, true), env.bouncerPool(b, params, false)}
}

// bouncerPool opens the wrapper's pool, or the bare driver's, through a
// faultlab proxy of its own to PgBouncer.
func (env *scEnv) bouncerPool(b *faultlab.PgBouncer, params string, wrapper bool) *scPool {
	env.t.Helper()
	name := env.e.bare
	if wrapper {
		name = env.e.wrapper
	}
	pr := env.newProxy(b.Addr())
	return env.openPool(name, wrapper, pr, fmt.Sprintf("postgres://postgres@%s/test?sslmode=disable&%s", pr.Addr(), params))
}

// bouncerProbe opens a fresh session through PgBouncer and runs a query,
// which makes PgBouncer reach PostgreSQL.
func bouncerProbe(b *faultlab.PgBouncer) func(context.Context) error {
	return func(ctx context.Context) error {
		c, err := pgx.Connect(ctx, b.DSN("test")+"&"+haTxMode)
		if err != nil {
			return err
		}
		defer c.Close(context.Background())
		_, err = c.Exec(ctx, "SELECT 1")
		return err
	}
}

// checkBouncerFault logs both pools' numbers for a stop/start fault and
// checks the wrapper's with checkFault's goals, behind gate.
//
// killedInFlight, when not nil, tells a statement the fault itself killed
// while it ran (a fault made of pg_terminate_backend of every backend, one
// after another, can catch a worker twice): those are allowed on top of
// one per worker; any other failure is not.
func (env *scEnv) checkBouncerFault(name string, ps []*scPool, f scFault, srv *scServer, killedInFlight func(error) bool) {
	t := env.t
	for _, p := range ps {
		fs := faultStats(p, f)
		w := env.haCheckRows(p, srv.dsn(srv.addr()))
		s := haStatsOf(p, f.stopBegin, f.stopEnd, f.up, f.stopEnd)
		env.haLog(name, p, s, fmt.Sprintf("%s; %s", w, fs.note(f)))
		g := goal(p)
		g.check(t, w.dups == 0 && w.missing == 0,
			"%s: %d duplicates, %d acknowledged writes missing; want 0, 0", p.name, w.dups, w.missing)
		killed := 0
		if killedInFlight != nil {
			for _, o := range p.rec.snapshot() {
				if o.err != nil && killedInFlight(o.err) {
					killed++
				}
			}
		}
		g.check(t, fs.failed-killed <= scLoadWorkers && fs.failedOutside == 0 && fs.failedAfterUp == 0,
			"%s: %d failed (in flight at the stop %d, killed in flight by the fault %d), %d that did not overlap the stop, %d that started after up: want <= %d (one per worker) besides those killed, 0, 0",
			p.name, fs.failed, fs.inflight, killed, fs.failedOutside, fs.failedAfterUp, scLoadWorkers)
		if f.outage {
			g.check(t, fs.firstOK >= 0 && f.recoveryLag(fs.firstOK) <= scRecoverBound,
				"%s: first success %v after the service accepted again at %v (the first client seen to get in), want within %v",
				p.name, f.recoveryLag(fs.firstOK), fmtDur(f.in), scRecoverBound)
			window := f.startBegin - f.stopBegin
			allowed := scAllowedConnects(window)
			g.check(t, fs.attempts <= allowed,
				"%s: %d connects reached the proxy in the %v of the outage, want <= %d (%d/s plus one per busy connection)",
				p.name, fs.attempts, fmtDur(window), allowed, scRefusalRate)
		}
	}
}

// TestPgBouncerTxPostgresRestart restarts PostgreSQL (fast) behind
// PgBouncer in transaction mode under write load. Whether PgBouncer tries
// a login while PostgreSQL is down decides whether it then refuses
// queries for server_login_retry: hence the gate.
func TestPgBouncerTxPostgresRestart(t *testing.T) {
	srv, b := startBouncer(t, "transaction", nil)
	env := newHAEnv(t, haPG)
	ps := env.bouncerPools(b, haTxMode)
	env.warm(ps, "SELECT 1")
	// Up is when a query through PgBouncer works again: after its own
	// server_login_retry, if it tried to log in while PostgreSQL was away.
	f := env.haStopStart(ps, func() error { return srv.stop(faultlab.StopFast) }, 0, srv.start, bouncerProbe(b), env.haInsert)
	env.checkBouncerFault("pgbouncer tx: postgres restart", ps, f, srv, nil)
}

// TestPgBouncerLoginRetry makes the database refuse logins for 1 s under
// write load (ALLOW_CONNECTIONS false, then every backend terminated):
// PgBouncer's logins fail meanwhile, and for server_login_retry after the
// last one it answers every query that needs a new server connection with
// FATAL 08P01 "server login has been failing, try again later
// (server_login_retry)", although the database is back. That is what a
// restart does when PgBouncer logs in while PostgreSQL is shutting down or
// starting up (57P03), which TestPgBouncerTxPostgresRestart hits only in
// some runs; this reproduces it every time. query_wait_timeout is 1 s
// (default 120 s) so that queries queued during the refusal are sent
// away (08P01 "query_wait_timeout") and come back while PgBouncer still
// refuses. Goal: the outage goals, as without PgBouncer.
func TestPgBouncerLoginRetry(t *testing.T) {
	srv, b := startBouncer(t, "transaction", map[string]string{"query_wait_timeout": "1"})
	env := newHAEnv(t, haPG)
	ps := env.bouncerPools(b, haTxMode)
	env.warm(ps, "SELECT 1")
	refuse := func() error {
		if err := srv.pg.Exec(env.ctx, "ALTER DATABASE test ALLOW_CONNECTIONS false"); err != nil {
			return err
		}
		srv.killAll(env.ctx, t)
		// PostgreSQL no longer lists the backends, but PgBouncer may not
		// have read their FATAL yet and can still hand a statement to one
		// of them: the fault ends when PgBouncer has let them go.
		return awaitBouncerServersGone(env.ctx, b)
	}
	allow := func(ctx context.Context) error { return srv.pg.Exec(ctx, "ALTER DATABASE test ALLOW_CONNECTIONS true") }
	// Up is when a query through PgBouncer works again, server_login_retry
	// after its last failed login; the database itself is back earlier,
	// when allow returns (f.startEnd).
	f := env.haStopStart(ps, refuse, time.Second, allow, bouncerProbe(b), env.haInsert)
	env.checkBouncerFault("pgbouncer tx: logins refused 1s (server_login_retry=2s)", ps, f, srv, adminShutdown)
	seen := 0
	for _, p := range ps {
		for _, o := range p.rec.snapshot() {
			if o.err != nil && o.start >= f.startEnd && strings.Contains(o.err.Error(), "server login has been failing") {
				seen++
			}
		}
	}
	if seen == 0 {
		t.Errorf("precondition: no query started after the database was back got 'server login has been failing': the scenario did not reproduce PgBouncer's retry state")
	}
}

// adminShutdown tells a statement killed while it ran by
// pg_terminate_backend (57P01, which PgBouncer forwards).
func adminShutdown(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "57P01"
}

// TestPgBouncerRestart stops PgBouncer with SIGTERM under write load and
// starts it again 1 s later: in-flight queries get EOF, the rest must
// wait as for any outage.
//
// The wrapper's pool and the bare one meet the fault one after the other,
// each with a PgBouncer of its own, not side by side as in the other
// tests: while PgBouncer is down the bare pool dials about 3,000 times a
// second through the in-process proxies, which then pass PgBouncer's
// close on to the wrapper's connections late (31 ms once). A statement
// the wrapper sent into that gap, after PgBouncer had exited but before
// anything of it could reach the wrapper's sockets, failed as "outside
// the stop": 4 of 57 runs side by side, 0 of 40 with the wrapper's pool
// alone. The checks are the same.
func TestPgBouncerRestart(t *testing.T) {
	for _, wrapper := range []bool{true, false} {
		name := "bare"
		if wrapper {
			name = "wrapper"
		}
		t.Run(name, func(t *testing.T) {
			srv, b := startBouncer(t, "transaction", nil)
			env := newHAEnv(t, haPG)
			ps := []*scPool{env.bouncerPool(b, haTxMode, wrapper)}
			env.warm(ps, "SELECT 1")
			f := env.haStopStart(ps, func() error { return b.Stop(faultlab.StopFast) }, time.Second, b.Start, bouncerProbe(b), env.haInsert)
			env.checkBouncerFault("pgbouncer SIGTERM, started 1s later", ps, f, srv, nil)
		})
	}
}

// TestPgBouncerPause pauses PgBouncer for 2 s under load: queries wait and
// none fails; none waits longer than the pause plus 100 ms.
func TestPgBouncerPause(t *testing.T) {
	_, b := startBouncer(t, "transaction", nil)
	env := newHAEnv(t, haPG)
	ps := env.bouncerPools(b, haTxMode)
	env.warm(ps, "SELECT 1")
	halt := env.load(ps, scLoadWorkers, scMaxOps, selectOne)
	env.sleepUntil(scFaultAt)
	pauseBegin := env.now()
	if err := b.Admin(env.ctx, "PAUSE"); err != nil {
		t.Fatal(err)
	}
	paused := env.now()
	env.sleepUntil(pauseBegin + 2*time.Second)
	if err := b.Admin(env.ctx, "RESUME"); err != nil {
		t.Fatal(err)
	}
	resumed := env.now()
	env.sleepUntil(resumed + time.Second)
	halt()
	pause := resumed - pauseBegin
	t.Logf("PAUSE sent %v, in force %v, RESUME done %v: paused %v", fmtDur(pauseBegin), fmtDur(paused), fmtDur(resumed), fmtDur(pause))
	for _, p := range ps {
		s := haStatsOf(p, pauseBegin, resumed, resumed, resumed)
		env.haLog("pgbouncer PAUSE 2s, RESUME", p, s, fmt.Sprintf("pause %v", fmtDur(pause)))
		goal(p).check(t, s.failed == 0 && s.maxLat <= pause+100*time.Millisecond,
			"%s: %d failed, slowest %v; want 0 failed, none slower than the pause %v + 100ms", p.name, s.failed, s.maxLat, pause)
	}
}

// TestPgBouncerSessionKill ends every PostgreSQL session behind PgBouncer
// in session mode (pg_terminate_backend) right after the pools were used:
// PgBouncer passes the backend's 57P01 on and closes the client
// connection, which the wrapper's checkout check must catch.
func TestPgBouncerSessionKill(t *testing.T) {
	srv, b := startBouncer(t, "session", nil)
	env := newHAEnv(t, haPG)
	ps := env.bouncerPools(b, "")
	env.warm(ps, "SELECT 1")
	n := srv.killAll(env.ctx, t)
	if n < 2*scPoolSize {
		t.Fatalf("precondition: killed %d backends, want both pools' %d", n, 2*scPoolSize)
	}
	time.Sleep(2 * scSettle) // two hops: PostgreSQL to PgBouncer, PgBouncer to the proxy
	env.burst(ps, scBurstN, scBurstC, selectOne)
	for _, p := range ps {
		s := haStatsOf(p, 0, 0, 0, 0)
		note := fmt.Sprintf("%d backends killed", n)
		if p.wrapper {
			note += "; " + account(env.stats(p))
		}
		env.haLog("pgbouncer session: every backend terminated", p, s, note)
		goal(p).check(t, s.failed == 0, "%s: %d of %d queries failed, want 0", p.name, s.failed, s.ops)
	}
}

// TestPgBouncerQueryModes records which pgx query modes work under
// transaction pooling (two server connections shared by 10 clients), with
// the wrapper pinging at every checkout (the ping must work through
// PgBouncer), and what db.Prepare does there.
func TestPgBouncerQueryModes(t *testing.T) {
	_, b := startBouncer(t, "transaction", map[string]string{"default_pool_size": "2"})
	query := func(ctx context.Context, p *scPool) (int64, error) {
		var n int64
		err := p.db.QueryRowContext(ctx, "SELECT $1::bigint", 7).Scan(&n)
		return n, err
	}
	for _, mode := range []string{"cache_statement", "cache_describe", "exec", "simple_protocol", "exec+db.Prepare"} {
		t.Run(mode, func(t *testing.T) {
			env := newHAEnv(t, haPG)
			qm := "default_query_exec_mode=" + mode
			if mode == "exec+db.Prepare" {
				qm = "default_query_exec_mode=exec"
			}
			dsn := b.DSN("test") + "&" + qm
			ps := env.haPools(dsn+"&resilient_ping=always", dsn)
			op := query
			if mode == "exec+db.Prepare" {
				stmts := map[*scPool]func(context.Context) (int64, error){}
				for _, p := range ps {
					// A text of its own per pool: pgx names statements by
					// their text, and both pools share PgBouncer's servers.
					st, err := p.db.PrepareContext(env.ctx, "SELECT $1::bigint -- "+p.name)
					if err != nil {
						t.Fatalf("%s: Prepare: %v", p.name, err)
					}
					t.Cleanup(func() { st.Close() })
					stmts[p] = func(ctx context.Context) (int64, error) {
						var n int64
						return n, st.QueryRowContext(ctx, 7).Scan(&n)
					}
				}
				op = func(ctx context.Context, p *scPool) (int64, error) { return stmts[p](ctx) }
			}
			env.burst(ps, scBurstN, scBurstC, op)
			for _, p := range ps {
				s := haStatsOf(p, 0, 0, 0, 0)
				note := qm
				if p.wrapper {
					st := env.stats(p)
					note += fmt.Sprintf(", resilient_ping=always: %d pings, %d failed", st.Pings, st.PingFailures)
					if mode != "cache_statement" && mode != "exec+db.Prepare" {
						if s.failed != 0 || st.Pings == 0 || st.PingFailures != 0 {
							t.Errorf("%s under transaction pooling: %d failed, %d pings, %d ping failures; want 0, > 0, 0", p.name, s.failed, st.Pings, st.PingFailures)
						}
					}
				}
				env.haLog("pgbouncer tx, 2 server conns: "+mode, p, s, note)
			}
		})
	}
}

// awaitBouncerServersGone polls (100 times, 20 ms apart, or until ctx ends)
// until PgBouncer holds no server connection that was logged in: only
// logins in progress ("new") may remain, which the refusal fails.
func awaitBouncerServersGone(ctx context.Context, b *faultlab.PgBouncer) error {
	var left int
	for range 100 {
		rows, err := b.Show(ctx, "SERVERS")
		if err != nil {
			return err
		}
		left = 0
		for _, r := range rows {
			if r["state"] != "new" {
				left++
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("PgBouncer still holds %d server connections 2 s after their backends were terminated", left)
}
