package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/eventlog"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// The scenario table's fixed parameters.
const (
	scPoolSize    = 10
	scOpTimeout   = 5 * time.Second // every operation's own deadline
	scBurstN      = 200
	scBurstC      = 10
	scHalfOpenN   = 100
	scLoadWorkers = 8
	scFaultAt     = 2 * time.Second // when a fault hits a running load
	scLoadRun     = 6 * time.Second // how long a load runs at least
	scAfterUp     = 3 * time.Second // how long a load runs on after the server is back
	scOutage      = 3 * time.Second
	scMaxOps      = 200_000 // per worker, a bound that no scenario reaches

	// The wrapper's defaults the goals are stated in.
	scPingTimeout = 2 * time.Second // resilient_ping_timeout
	scPingIdle    = time.Second     // resilient_ping_idle
	scBackoffMax  = time.Second     // resilient_connect_backoff_max

	// The recovery goals: the first success within scRecoverBound of the
	// server accepting again (scFault.settleIn); while it is down, at most scRefusalRate
	// connects a second per pool (a refusal is probed every
	// resilient_probe_interval, 30 ms on average), plus one per busy
	// connection (pgx's cancel requests can race the gate).
	scRecoverBound = 100 * time.Millisecond
	// scRecoverBeside bounds the same beside a bare pool's connect storm
	// (see checkFault).
	scRecoverBeside = scBackoffMax + 500*time.Millisecond
	scRefusalRate   = 40

	// scSettle lets the proxy pass a server-side close on to the client
	// socket after the server has confirmed a kill: on a direct connection
	// the kernel does that at once, through the proxy it takes one of its
	// goroutines a moment.
	scSettle = 50 * time.Millisecond
)

// TestFaultScenarios runs one table of faults against both engines. Every
// scenario gets a throwaway server of its own, a faultlab proxy in front of
// every pool, and runs the same workload through the wrapper and through
// the bare driver side by side: same fault, same moment, two pools of 10.
// Only the wrapper is asserted; the bare driver is measured for contrast.
// The table of both is logged at the end and written to the file named by
// RESILIENTPG_SCENARIO_TABLE.
func TestFaultScenarios(t *testing.T) {
	table := &scTable{}
	for _, e := range scEngines {
		t.Run(e.name, func(t *testing.T) {
			for _, sc := range scScenarios {
				if sc.pgOnly && !e.pg {
					continue
				}
				t.Run(sc.name, func(t *testing.T) {
					env := newScEnv(t, e)
					defer env.report(table, sc.name)
					sc.run(env)
				})
			}
		})
	}
	table.emit(t)
}

type scScenario struct {
	name   string
	pgOnly bool
	run    func(env *scEnv)
}

var scScenarios = []scScenario{
	{name: "killed-idle-1.5s", run: scKilled(false)},
	{name: "killed-after-use", run: scKilled(true)},
	{name: "restart-idle", run: scRestartIdle},
	{name: "idle-timeout", run: scIdleTimeout},
	{name: "half-open-idle-2s", run: scHalfOpenIdle},
	{name: "half-open-ping-always", run: scHalfOpenAlways},
	{name: "restart-under-load", run: scFaultUnderLoad(faultlab.StopFast, 0)},
	{name: "outage-3s-under-load", run: scFaultUnderLoad(faultlab.StopImmediate, scOutage)},
	{name: "read-only-failover", pgOnly: true, run: scReadOnlyFailover},
	{name: "writes-restart", run: scWrites(faultlab.StopFast, 0)},
	{name: "writes-outage-3s", run: scWrites(faultlab.StopImmediate, scOutage)},
	{name: "tx-writes-restart", run: scTxWrites(faultlab.StopFast, 0)},
	{name: "tx-writes-outage-3s", run: scTxWrites(faultlab.StopImmediate, scOutage)},
	{name: "max-age-2s", run: scMaxAge},
}

// ---- environment ----

// scPool is one pool under test, behind a proxy of its own, so that the
// proxy's accept count is the pool's connect attempts.
type scPool struct {
	name    string // driver name, as in the table
	wrapper bool
	proxy   *faultlab.Proxy
	db      *sql.DB
	rec     scRec
	seq     atomic.Int64 // client-generated row ids
	table   string       // the write scenarios' table
	note    string
	log     *eventlog.Recorder // the wrapper's events; nil for the bare driver
}

type scEnv struct {
	t     *testing.T
	e     scEngine
	srv   *scServer
	ctx   context.Context // bounds the whole scenario
	t0    time.Time       // operation times are relative to this
	pools []*scPool
}

func newScEnv(t *testing.T, e scEngine) *scEnv {
	t.Helper()
	env := &scEnv{t: t, e: e, srv: startScServer(t, e)}
	env.ctx = ctxT(t, 3*time.Minute)
	env.t0 = time.Now()
	return env
}

func (env *scEnv) now() time.Duration { return time.Since(env.t0) }

func (env *scEnv) sleepUntil(at time.Duration) { time.Sleep(time.Until(env.t0.Add(at))) }

func (env *scEnv) newProxy(target string) *faultlab.Proxy {
	env.t.Helper()
	p, err := faultlab.NewProxy(target)
	if err != nil {
		env.t.Fatal(err)
	}
	env.t.Cleanup(func() { p.Close() }) // registered before the pool's, so it runs after
	return p
}

// openPool opens a pool of 10 with dsn, whose connections go through proxy.
func (env *scEnv) openPool(driverName string, wrapper bool, proxy *faultlab.Proxy, dsn string) *scPool {
	env.t.Helper()
	var log *eventlog.Recorder
	var db *sql.DB
	if wrapper {
		log = &eventlog.Recorder{}
		db = env.openWrapperDB(dsn, log)
	} else {
		var err error
		if db, err = sql.Open(driverName, dsn); err != nil {
			env.t.Fatalf("sql.Open(%q): %v", driverName, err)
		}
	}
	env.t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(scPoolSize)
	db.SetMaxIdleConns(scPoolSize)
	p := &scPool{name: driverName, wrapper: wrapper, proxy: proxy, db: db, log: log}
	env.pools = append(env.pools, p)
	return p
}

// standardPools opens the wrapper's pool (with wrapperKeys) and the bare
// driver's, each behind its own proxy to the scenario's server.
func (env *scEnv) standardPools(wrapperKeys ...string) []*scPool {
	env.t.Helper()
	wp := env.newProxy(env.srv.addr())
	w := env.openPool(env.e.wrapper, true, wp, env.srv.dsn(wp.Addr(), wrapperKeys...))
	bp := env.newProxy(env.srv.addr())
	b := env.openPool(env.e.bare, false, bp, env.srv.dsn(bp.Addr()))
	return []*scPool{w, b}
}

// report adds the scenario's rows to the table, also when it failed.
func (env *scEnv) report(table *scTable, scenario string) {
	for _, p := range env.pools {
		note := p.note
		if p.wrapper && env.t.Failed() {
			note = "GOAL MISSED; " + note
		}
		if !p.wrapper {
			note = "(measured) " + note
		}
		sum := summarize(p.rec.snapshot())
		table.add(scRow{engine: env.e.name, scenario: scenario, driver: p.name, sum: sum, note: note})
		env.t.Logf("%s: %d ops, %d failed, p99 %v; %s; first error: %s", p.name, sum.ops, sum.failed, fmtDur(sum.p99), note, sum.firstErr)
	}
}

// ---- workloads ----

// scOpFunc is one application operation; it returns what it read or wrote.
type scOpFunc func(ctx context.Context, p *scPool) (int64, error)

func selectOne(ctx context.Context, p *scPool) (int64, error) {
	var n int64
	err := p.db.QueryRowContext(ctx, "SELECT 1").Scan(&n)
	return n, err
}

func (env *scEnv) queryInt(q string) scOpFunc {
	return func(ctx context.Context, p *scPool) (int64, error) {
		var n int64
		err := p.db.QueryRowContext(ctx, q).Scan(&n)
		return n, err
	}
}

// do runs one operation with its own deadline and records it.
func (env *scEnv) do(p *scPool, op scOpFunc) {
	ctx, cancel := context.WithTimeout(env.ctx, scOpTimeout)
	start := env.now()
	v, err := op(ctx, p)
	end := env.now()
	cancel()
	p.rec.add(scOp{start: start, end: end, val: v, err: err})
}

// burst runs n operations at concurrency c on every pool at once.
func (env *scEnv) burst(pools []*scPool, n, c int, op scOpFunc) {
	env.t.Helper()
	var wg sync.WaitGroup
	for _, p := range pools {
		var next atomic.Int64
		for range c {
			wg.Go(func() {
				for next.Add(1) <= int64(n) {
					env.do(p, op)
				}
			})
		}
	}
	env.await(&wg, time.Duration(n/c+1)*scOpTimeout+10*time.Second)
}

// load starts workers per pool running op back to back; the returned
// function stops them and waits. It also runs at cleanup, so a failed
// scenario leaves no worker behind.
func (env *scEnv) load(pools []*scPool, workers, maxOps int, op scOpFunc) (stop func()) {
	env.t.Helper()
	return env.loadPaced(pools, workers, maxOps, op, 0)
}

// loadPaced is load with each worker pausing between its operations.
func (env *scEnv) loadPaced(pools []*scPool, workers, maxOps int, op scOpFunc, pause time.Duration) (stop func()) {
	env.t.Helper()
	stopCh := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range pools {
		for range workers {
			wg.Go(func() {
				for range maxOps {
					select {
					case <-stopCh:
						return
					default:
					}
					env.do(p, op)
					if pause > 0 {
						time.Sleep(pause)
					}
				}
			})
		}
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			close(stopCh)
			env.await(&wg, scOpTimeout+10*time.Second)
		})
	}
	env.t.Cleanup(stop)
	return stop
}

func (env *scEnv) await(wg *sync.WaitGroup, limit time.Duration) {
	env.t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	awaitWorkers(env.t, done, limit, nil)
}

// warm checks out all 10 connections of each pool at once, runs q on each
// and puts them back: every pool then holds 10 used, idle connections. It
// returns each pool's sorted results (session ids, for an id query).
func (env *scEnv) warm(pools []*scPool, q string) [][]int64 {
	env.t.Helper()
	out := make([][]int64, len(pools))
	for i, p := range pools {
		conns := make([]*sql.Conn, 0, scPoolSize)
		for range scPoolSize {
			c, err := p.db.Conn(env.ctx)
			if err != nil {
				env.t.Fatalf("%s: warm-up checkout: %v", p.name, err)
			}
			conns = append(conns, c)
		}
		for _, c := range conns {
			var v int64
			if err := c.QueryRowContext(env.ctx, q).Scan(&v); err != nil {
				env.t.Fatalf("%s: warm-up query: %v", p.name, err)
			}
			out[i] = append(out[i], v)
		}
		for _, c := range conns {
			c.Close()
		}
		slices.Sort(out[i])
	}
	return out
}

func (env *scEnv) requireNoFailures(p *scPool) {
	env.t.Helper()
	if s := summarize(p.rec.snapshot()); s.failed != 0 {
		env.t.Errorf("%s: %d of %d operations failed, want 0; first error: %s", p.name, s.failed, s.ops, s.firstErr)
	}
}

// ---- scenarios: a fault on an idle pool, then a burst ----

// scKilled ends every pooled session server-side while the pools are idle,
// after 1.5 s (a checkout ping is due) or right after use (none is due: only
// the socket check or the driver's own check can tell).
func scKilled(usedJustBefore bool) func(env *scEnv) {
	return func(env *scEnv) {
		ps := env.standardPools()
		useStart := env.now()
		env.warm(ps, env.e.idQuery())
		if !usedJustBefore {
			time.Sleep(1500 * time.Millisecond)
		}
		n := env.srv.killAll(env.ctx, env.t)
		time.Sleep(scSettle)
		if n < 2*scPoolSize {
			env.t.Fatalf("precondition: killed %d sessions, want both pools' %d", n, 2*scPoolSize)
		}
		if age := env.now() - useStart; usedJustBefore && age >= 900*time.Millisecond {
			// Past the 1 s ping-idle threshold this would quietly become the
			// idle variant.
			env.t.Fatalf("precondition: the kill ended %v after the warm-up began, want < 900ms", age)
		}
		for _, p := range ps {
			p.note = fmt.Sprintf("%d sessions of both pools killed %v after the warm-up began", n, (env.now() - useStart).Round(time.Millisecond))
		}
		env.burst(ps, scBurstN, scBurstC, selectOne)
		env.requireNoFailures(ps[0])
		// Each dead connection discarded once: found closed by the socket
		// peek, or retired with the pool when the peek found every idle
		// connection closed at once.
		env.checkDiscards(ps[0], scPoolSize, resilientpg.DiscardServerClosed, resilientpg.DiscardInvalidated)
	}
}

func scRestartIdle(env *scEnv) {
	ps := env.standardPools()
	env.warm(ps, "SELECT 1")
	start := time.Now()
	if err := env.srv.restart(env.ctx, faultlab.StopFast); err != nil {
		env.t.Fatal(err)
	}
	for _, p := range ps {
		p.note = fmt.Sprintf("fast restart took %v", time.Since(start).Round(time.Millisecond))
	}
	env.burst(ps, scBurstN, scBurstC, selectOne)
	env.requireNoFailures(ps[0])
	// The first checkout finds every idle connection closed at once: one
	// invalidation retires all ten, without a ping each.
	s := env.checkDiscards(ps[0], scPoolSize, resilientpg.DiscardInvalidated)
	if s.Invalidations.Total() != 1 {
		env.t.Errorf("%s: invalidations %v, want exactly 1", ps[0].name, s.Invalidations)
	}
}

// scIdleTimeout lets the server's own idle timeout (1 s) end every pooled
// session while the pools sit idle for 2 s.
func scIdleTimeout(env *scEnv) {
	env.srv.setIdleTimeout(env.ctx, env.t)
	ps := env.standardPools()
	env.warm(ps, "SELECT 1")
	time.Sleep(2 * time.Second)
	if n := env.srv.clientSessions(env.ctx, env.t); n != 0 {
		env.t.Fatalf("precondition: %d client sessions survived 2 s of idleness with a 1 s server idle timeout", n)
	}
	what := "idle_session_timeout=1s"
	if !env.e.pg {
		what = "wait_timeout=1"
	}
	for _, p := range ps {
		p.note = what + ", pool idle 2s"
	}
	env.burst(ps, scBurstN, scBurstC, selectOne)
	env.requireNoFailures(ps[0])
}

// scHalfOpenIdle black-holes every pooled connection (a NAT or load
// balancer dropping the flows silently) after 2 s of idleness: only a
// bounded round trip can tell, so the wrapper's cost is one ping timeout
// plus one connect.
func scHalfOpenIdle(env *scEnv) {
	ps := env.standardPools()
	env.warm(ps, "SELECT 1")
	time.Sleep(2 * time.Second)
	for _, p := range ps {
		n := p.proxy.BlackholeAll()
		if n != scPoolSize {
			env.t.Fatalf("precondition: %s: %d connections black-holed, want %d", p.name, n, scPoolSize)
		}
		p.note = fmt.Sprintf("%d conns black-holed after 2s idle", n)
	}
	env.burst(ps, scHalfOpenN, scBurstC, selectOne)
	env.requireNoFailures(ps[0])
	env.checkDiscards(ps[0], scPoolSize, resilientpg.DiscardPingFailed)
	limit := scPingTimeout + time.Second
	if s := summarize(ps[0].rec.snapshot()); s.p99 > limit {
		env.t.Errorf("%s: p99 %v, want <= ping timeout %v + one connect (1s) = %v", ps[0].name, s.p99, scPingTimeout, limit)
	}
}

// scHalfOpenAlways black-holes connections used a moment ago: the idle
// threshold does not call for a ping, resilient_ping=always does.
func scHalfOpenAlways(env *scEnv) {
	ps := env.standardPools("resilient_ping=always")
	env.warm(ps, "SELECT 1")
	for _, p := range ps {
		n := p.proxy.BlackholeAll()
		if n != scPoolSize {
			env.t.Fatalf("precondition: %s: %d connections black-holed, want %d", p.name, n, scPoolSize)
		}
		p.note = fmt.Sprintf("%d conns black-holed right after use", n)
	}
	ps[0].note += ", resilient_ping=always"
	env.burst(ps, scHalfOpenN, scBurstC, selectOne)
	env.requireNoFailures(ps[0])
	env.checkDiscards(ps[0], scPoolSize, resilientpg.DiscardPingFailed)
}

// ---- scenarios: a fault under load ----

// scFault is when a stop/start fault happened, relative to the scenario's
// t0, and each pool's proxy accept count at its edges.
type scFault struct {
	stopBegin, stopEnd, startBegin, startEnd time.Duration
	up                                       time.Duration // a session that got in began (watchUp)
	upConnect                                time.Duration // how long that session took to get in
	in                                       time.Duration // the server accepted again; see settleIn
	accStop, accStart, accStartEnd           map[*scPool]int64
	outage                                   bool
	// buckets[p][i] is how many connections reached p's proxy in the i-th
	// 500 ms after the stop began, while the server was down.
	buckets map[*scPool][]int64
}

const scBucket = 500 * time.Millisecond

// sampleAccepts records each pool's proxy accept count every scBucket
// until done closes (at most 2 minutes).
func sampleAccepts(pools []*scPool, done <-chan struct{}) <-chan map[*scPool][]int64 {
	out := make(chan map[*scPool][]int64, 1)
	go func() {
		prev := accepted(pools)
		b := map[*scPool][]int64{}
		tick := time.NewTicker(scBucket)
		defer tick.Stop()
		defer func() { out <- b }()
		for range int(2 * time.Minute / scBucket) {
			end := false
			select {
			case <-done:
				end = true // the last, partial bucket
			case <-tick.C:
			}
			now := accepted(pools)
			for _, p := range pools {
				b[p] = append(b[p], now[p]-prev[p])
			}
			prev = now
			if end {
				return
			}
		}
	}()
	return out
}

func accepted(pools []*scPool) map[*scPool]int64 {
	m := make(map[*scPool]int64, len(pools))
	for _, p := range pools {
		m[p] = p.proxy.Accepted()
	}
	return m
}

// stopStartUnderLoad runs 8 workers per pool back to back, stops the server
// at 2 s with mode, starts it again after outage, and lets the load run on
// until 6 s or 3 s after the server is back, whichever is later.
func (env *scEnv) stopStartUnderLoad(pools []*scPool, mode faultlab.StopMode, outage time.Duration, maxOps int, op scOpFunc) scFault {
	env.t.Helper()
	stop := env.load(pools, scLoadWorkers, maxOps, op)
	env.sleepUntil(scFaultAt)
	f := scFault{outage: outage > 0}
	f.accStop = accepted(pools)
	sampling := make(chan struct{})
	samples := sampleAccepts(pools, sampling)
	stopSampling := sync.OnceFunc(func() { close(sampling) })
	defer stopSampling() // if a stop or start fails
	f.stopBegin = env.now()
	if err := env.srv.stop(mode); err != nil {
		stop()
		env.t.Fatalf("stop (%v): %v", mode, err)
	}
	f.stopEnd = env.now()
	upCh := env.srv.watchUp(env.ctx, env.t0)
	time.Sleep(outage)
	f.accStart = accepted(pools)
	f.startBegin = env.now()
	stopSampling()
	f.buckets = <-samples
	if err := env.srv.start(env.ctx); err != nil {
		stop()
		env.t.Fatalf("start: %v", err)
	}
	f.startEnd = env.now()
	f.accStartEnd = accepted(pools)
	f.up, f.upConnect = awaitUp(upCh, f.startEnd)
	env.sleepUntil(max(scLoadRun, f.startEnd+scAfterUp))
	stop()
	f.settleIn(pools, f.startEnd)
	env.t.Logf("fault (%v): stop %v..%v, start %v..%v, accepting again at %v (the first client seen to get in; a direct poller's session began at %v and got in after %v)",
		mode, fmtDur(f.stopBegin), fmtDur(f.stopEnd), fmtDur(f.startBegin), fmtDur(f.startEnd), fmtDur(f.in), fmtDur(f.up), fmtDur(f.upConnect))
	return f
}

// settleIn sets f.in, the moment the server accepted again: when the
// first client was seen to get in after the fault, the direct poller
// (watchUp: its session's start plus the time it took to get in) or any
// pool of the scenario, the bare driver's included, which dials thousands
// of times a second. Its session's set-up is the server's own time: a
// forked process, which right after a restart also rebuilds the catalog
// cache. On this project's 2-CPU VM that took the poller 70-400 ms after
// a restart, more than the recovery bound itself, and no client can have
// its first success before the server has let one in; what the bound
// measures is the wrapper's own delay, which its probe schedule decides.
// gotIn, when positive, is a moment by which a session is known to have
// got in (faultlab's Start returns only then).
func (f *scFault) settleIn(pools []*scPool, gotIn time.Duration) {
	f.in = f.up + f.upConnect
	if gotIn > 0 {
		f.in = min(f.in, gotIn)
	}
	for _, p := range pools {
		if ok := firstOKAfter(p, f.stopEnd); ok >= 0 {
			f.in = min(f.in, ok)
		}
	}
}

// firstOKAfter is when p's first successful operation after t ended, or
// -1.
func firstOKAfter(p *scPool, t time.Duration) time.Duration {
	ok := time.Duration(-1)
	for _, o := range p.rec.snapshot() {
		if o.err == nil && o.end > t && (ok < 0 || o.end < ok) {
			ok = o.end
		}
	}
	return ok
}

// recoveryLag is how long after the server accepted again (f.in) a
// pool's first success came.
func (f *scFault) recoveryLag(firstOK time.Duration) time.Duration { return firstOK - f.in }

// scFaultStats is what one pool saw of a stop/start fault.
type scFaultStats struct {
	failed        int
	inflight      int // in flight at the moment the stop began
	overlapping   int // in flight at some moment of the stop (stopBegin..stopEnd)
	failedOutside int // failed without overlapping the stop: they met the server down or back
	failedAfterUp int // failed although they started after the server accepted again
	firstOK       time.Duration
	attempts      int64   // connections reaching the pool's proxy from stop to start
	rate          float64 // attempts per second of that interval
	buckets       []int64 // attempts per 500 ms of that interval
}

func faultStats(p *scPool, f scFault) scFaultStats {
	var s scFaultStats
	s.firstOK = -1
	for _, o := range p.rec.snapshot() {
		overlaps := o.start < f.stopEnd && o.end > f.stopBegin
		if overlaps {
			s.overlapping++
		}
		if o.start <= f.stopBegin && o.end > f.stopBegin {
			s.inflight++
		}
		if o.err != nil {
			s.failed++
			if !overlaps {
				s.failedOutside++
			}
			if o.start >= f.up {
				s.failedAfterUp++
			}
		} else if o.end > f.stopEnd && (s.firstOK < 0 || o.end < s.firstOK) {
			s.firstOK = o.end
		}
	}
	s.attempts = f.accStart[p] - f.accStop[p]
	s.buckets = f.buckets[p]
	s.rate = float64(s.attempts) / (f.startBegin - f.stopBegin).Seconds()
	return s
}

func (s scFaultStats) note(f scFault) string {
	first := "none"
	if s.firstOK >= 0 {
		first = fmt.Sprintf("in%s (a direct poller's session took %v to get in: first ok %s from its start)",
			signedMs(f.recoveryLag(s.firstOK)), fmtDur(f.upConnect), signedMs(s.firstOK-f.up))
	}
	n := fmt.Sprintf("in flight as the stop began %d, during the stop %d; failed outside the stop %d, after up %d; first ok %s",
		s.inflight, s.overlapping, s.failedOutside, s.failedAfterUp, first)
	if !f.outage {
		return n + fmt.Sprintf("; connects during the restart %d", s.attempts)
	}
	return n + fmt.Sprintf("; connects while down %d in %v (%.1f/s; per 500ms: %s)",
		s.attempts, (f.startBegin-f.stopBegin).Round(10*time.Millisecond), s.rate, s.bucketList())
}

// signedMs renders d rounded to the millisecond with its sign: "+72ms".
func signedMs(d time.Duration) string {
	d = d.Round(time.Millisecond)
	if d < 0 {
		return d.String()
	}
	return "+" + d.String()
}

func (s scFaultStats) bucketList() string {
	parts := make([]string, len(s.buckets))
	for i, n := range s.buckets {
		parts[i] = strconv.FormatInt(n, 10)
	}
	return strings.Join(parts, ",")
}

// checkFault asserts the wrapper's goals for a stop/start under load: only
// operations caught by the stop itself may fail (at most one per worker),
// and none that started once the server accepted again. The first
// success must follow within one backoff cap plus 500 ms (scRecoverBeside),
// and after an outage the pool's connect attempts while the server is
// down stay at scRefusalRate a second plus one per connection busy when it
// went. The recovery bound itself (scRecoverBound, 100 ms) is asserted by
// TestRecoveryBound, with the wrapper's pool alone: here a bare pool
// beside it floods the server's accept queue as it comes back, and every
// other client's session waits behind that flood.
func (env *scEnv) checkFault(p *scPool, f scFault, outage bool) {
	env.t.Helper()
	s := faultStats(p, f)
	if s.failed > scLoadWorkers {
		env.t.Errorf("%s: %d operations failed, want <= %d (one in flight per worker)", p.name, s.failed, scLoadWorkers)
	}
	if s.failedOutside > 0 {
		env.t.Errorf("%s: %d failed operations did not overlap the stop (%v..%v): they should have waited for the server and succeeded",
			p.name, s.failedOutside, fmtDur(f.stopBegin), fmtDur(f.stopEnd))
	}
	if s.failedAfterUp > 0 {
		env.t.Errorf("%s: %d operations failed that started after the server accepted again (%v)", p.name, s.failedAfterUp, fmtDur(f.up))
	}
	switch {
	case s.firstOK < 0:
		env.t.Errorf("%s: no operation succeeded after the fault", p.name)
	case f.recoveryLag(s.firstOK) > scRecoverBeside:
		env.t.Errorf("%s: first success %v after the server accepted again at %v (the first client seen to get in), want <= %v beside a bare pool",
			p.name, f.recoveryLag(s.firstOK), fmtDur(f.in), scRecoverBeside)
	}
	if !outage {
		return
	}
	// Probes, not one attempt per request: the proxy refuses while the
	// server is down, which is probed at the refusal rate.
	window := f.startBegin - f.stopBegin
	if allowed := scAllowedConnects(window); s.attempts > allowed {
		env.t.Errorf("%s: %d connection attempts reached the proxy in the %v between stop and start (%.1f/s; per 500ms: %s), want <= %d (%d/s plus one per busy connection)",
			p.name, s.attempts, window.Round(time.Millisecond), s.rate, s.bucketList(), allowed, scRefusalRate)
	}
}

// scAllowedConnects is the most connects a pool may make in window while
// the server refuses: scRefusalRate a second, plus one per connection that
// was busy when the server died, because pgx sends a cancel request for
// each query its server dropped (bare pgx does the same; while the server
// is known down the wrapper skips the rest).
func scAllowedConnects(window time.Duration) int64 {
	return int64(scLoadWorkers) + int64(scRefusalRate*window.Seconds()+0.5)
}

func scFaultUnderLoad(mode faultlab.StopMode, outage time.Duration) func(env *scEnv) {
	return func(env *scEnv) {
		ps := env.standardPools()
		env.warm(ps, "SELECT 1")
		f := env.stopStartUnderLoad(ps, mode, outage, scMaxOps, selectOne)
		for _, p := range ps {
			p.note = faultStats(p, f).note(f)
		}
		env.checkFault(ps[0], f, outage > 0)
		if outage > 0 {
			env.checkOutageEvents(ps[0], f)
		}
		ps[0].note += "; " + account(env.stats(ps[0]))
	}
}

// scWrites runs 8 writers per pool inserting client-generated ids into a
// table without a unique constraint through a stop/start: a write the
// wrapper ran twice would show up as a duplicate row, a write it lost as a
// missing acknowledged id.
func scWrites(mode faultlab.StopMode, outage time.Duration) func(env *scEnv) {
	return func(env *scEnv) {
		env.writes(mode, outage, func(ctx context.Context, p *scPool, id int64) error {
			_, err := p.db.ExecContext(ctx, env.e.insertSQL(p.table), id)
			return err
		})
	}
}

// scTxWrites is scWrites with each insert in a transaction run by
// resilientpg.RunTx (on both pools: RunTx works over any *sql.DB). Every
// error the wrapper's caller gets must be ErrCommitUnknown or its own
// deadline; how many of the unknown commits did commit is reported.
func scTxWrites(mode faultlab.StopMode, outage time.Duration) func(env *scEnv) {
	return func(env *scEnv) {
		ps := env.writes(mode, outage, func(ctx context.Context, p *scPool, id int64) error {
			return resilientpg.RunTx(ctx, p.db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, env.e.insertSQL(p.table), id)
				return err
			})
		})
		w := ps[0]
		got := rowIDs(env.ctx, env.t, env.srv.admin, w.table)
		unknown, unknownCommitted := 0, 0
		for _, o := range w.rec.snapshot() {
			switch {
			case o.err == nil:
			case errors.Is(o.err, resilientpg.ErrCommitUnknown):
				unknown++
				if got[o.val] > 0 {
					unknownCommitted++
				}
			case errors.Is(o.err, context.DeadlineExceeded):
			default:
				env.t.Errorf("%s: RunTx returned %v: want success, ErrCommitUnknown or the caller's deadline", w.name, o.err)
			}
		}
		s := env.stats(w)
		w.note += fmt.Sprintf("; RunTx: %d commit-unknown (%d of them committed), %d attempts, retries %v",
			unknown, unknownCommitted, s.TxAttempts, s.TxRetries)
	}
}

// writes runs 8 writers per pool inserting client-generated ids with write
// through a stop/start, and checks the wrapper's: no duplicate, no
// acknowledged write missing. It returns the pools, wrapper first.
func (env *scEnv) writes(mode faultlab.StopMode, outage time.Duration, write func(ctx context.Context, p *scPool, id int64) error) []*scPool {
	ps := env.standardPools()
	for i, p := range ps {
		p.table = fmt.Sprintf("rows_%d", i)
		env.srv.createTable(env.ctx, env.t, p.table)
	}
	env.warm(ps, "SELECT 1")
	insert := func(ctx context.Context, p *scPool) (int64, error) {
		id := p.seq.Add(1)
		return id, write(ctx, p, id)
	}
	f := env.stopStartUnderLoad(ps, mode, outage, scMaxOps, insert)
	for _, p := range ps {
		w := env.checkWrites(p)
		p.note = fmt.Sprintf("rows %d, duplicates %d, acked missing %d, failed but present %d/%d; %s",
			w.rows, w.dups, w.missing, w.failedPresent, w.failed, faultStats(p, f).note(f))
		if p.wrapper {
			if w.dups != 0 {
				env.t.Errorf("%s: %d duplicate rows: a write ran twice", p.name, w.dups)
			}
			if w.missing != 0 {
				env.t.Errorf("%s: %d acknowledged writes are missing", p.name, w.missing)
			}
			if w.strays != 0 {
				env.t.Errorf("%s: %d rows with ids never written (test bug?)", p.name, w.strays)
			}
		}
		env.t.Logf("%s: %d rows, %d duplicates, %d acknowledged missing, %d of %d failed writes present anyway",
			p.name, w.rows, w.dups, w.missing, w.failedPresent, w.failed)
	}
	return ps
}

type scWriteStats struct {
	rows, dups, missing, failed, failedPresent, strays int
}

func (env *scEnv) checkWrites(p *scPool) scWriteStats {
	env.t.Helper()
	got := rowIDs(env.ctx, env.t, env.srv.admin, p.table)
	var w scWriteStats
	tried := map[int64]bool{} // id -> acknowledged
	for _, o := range p.rec.snapshot() {
		tried[o.val] = o.err == nil
		if o.err != nil {
			w.failed++
			if got[o.val] > 0 {
				w.failedPresent++
			}
		} else if got[o.val] == 0 {
			w.missing++
		}
	}
	for id, n := range got {
		w.rows += n
		w.dups += n - 1
		if _, ok := tried[id]; !ok {
			w.strays++
		}
	}
	return w
}

// ---- scenarios: failover and rotation ----

// scReadOnlyFailover warms a pool on server A of a two-host DSN with
// target_session_attrs=read-write, then demotes A and promotes B: every
// write must land on B, none fail.
func scReadOnlyFailover(env *scEnv) {
	t, ctx := env.t, env.ctx
	a := env.srv
	b := startScServer(t, env.e)
	const table = "ro_rows"
	for _, s := range []*scServer{a, b} {
		s.exec(ctx, t, "CREATE TABLE "+table+" (id bigint NOT NULL, pool text NOT NULL)")
	}
	if err := b.pg.SetReadOnly(ctx, true); err != nil { // B starts as the standby
		t.Fatal(err)
	}
	var ps []*scPool
	for _, d := range []struct {
		name    string
		wrapper bool
	}{{env.e.wrapper, true}, {env.e.bare, false}} {
		pa, pb := env.newProxy(a.addr()), env.newProxy(b.addr())
		dsn := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=test sslmode=disable target_session_attrs=read-write",
			pa.Port(), pb.Port())
		ps = append(ps, env.openPool(d.name, d.wrapper, pa, dsn))
	}
	for i, ports := range env.warm(ps, "SELECT current_setting('port')::bigint") {
		for _, port := range ports {
			if port != int64(a.pg.Port) {
				t.Fatalf("precondition: %s warmed a session on port %d, want all on A (%d)", ps[i].name, port, a.pg.Port)
			}
		}
	}
	if err := a.pg.SetReadOnly(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := b.pg.SetReadOnly(ctx, false); err != nil {
		t.Fatal(err)
	}
	insert := func(ctx context.Context, p *scPool) (int64, error) {
		id := p.seq.Add(1)
		_, err := p.db.ExecContext(ctx, "INSERT INTO "+table+" (id, pool) VALUES ($1, $2)", id, p.name)
		return id, err
	}
	env.burst(ps, scBurstN, scBurstC, insert)
	for _, p := range ps {
		var onA, onB, distinctB int
		if err := a.admin.QueryRowContext(ctx, "SELECT count(*) FROM "+table+" WHERE pool = $1", p.name).Scan(&onA); err != nil {
			t.Fatal(err)
		}
		if err := b.admin.QueryRowContext(ctx, "SELECT count(*), count(DISTINCT id) FROM "+table+" WHERE pool = $1", p.name).Scan(&onB, &distinctB); err != nil {
			t.Fatal(err)
		}
		p.note = fmt.Sprintf("rows on A %d, on B %d (%d distinct)", onA, onB, distinctB)
		if p.wrapper {
			env.requireNoFailures(p)
			if onA != 0 || onB != scBurstN || distinctB != scBurstN {
				t.Errorf("%s: %d rows on A, %d on B (%d distinct), want 0 and %d", p.name, onA, onB, distinctB, scBurstN)
			}
		}
	}
}

// scMaxAge runs 10 workers for 6 s on pools whose connections live 2 s
// (the wrapper: resilient_max_age=2s with its 10% jitter; the bare driver:
// SetConnMaxLifetime(2s)): every warmed connection must be replaced, the
// replacements spread out, and no query fail.
func scMaxAge(env *scEnv) {
	const maxAge = 2 * time.Second
	ps := env.standardPools("resilient_max_age=" + maxAge.String())
	ps[1].db.SetConnMaxLifetime(maxAge)
	ps[1].note = "SetConnMaxLifetime(2s); "
	warmAt := env.now()
	gens := env.warm(ps, env.e.idQuery())
	stop := env.load(ps, scPoolSize, scMaxOps, env.queryInt(env.e.idQuery()))
	env.sleepUntil(warmAt + scLoadRun)
	stop()
	for i, p := range ps {
		first := map[int64]time.Duration{}
		for _, id := range gens[i] {
			first[id] = warmAt
		}
		later := map[int64]bool{}
		for _, o := range p.rec.snapshot() {
			if o.err != nil {
				continue
			}
			if last, ok := first[o.val]; ok {
				first[o.val] = max(last, o.end)
			} else {
				later[o.val] = true
			}
		}
		var lasts []time.Duration
		stale := 0
		limit := warmAt + maxAge + time.Second // max age, plus a query's time and scheduling slack
		for _, last := range first {
			lasts = append(lasts, last-warmAt)
			if last > limit {
				stale++
			}
		}
		slices.Sort(lasts)
		spread := lasts[len(lasts)-1] - lasts[0]
		p.note += fmt.Sprintf("first generation %d conns, last used %v..%v after warm-up (spread %v), %d still used after %v; %d later sessions",
			len(first), fmtDur(lasts[0]), fmtDur(lasts[len(lasts)-1]), fmtDur(spread), stale, maxAge+time.Second, len(later))
		if !p.wrapper {
			continue
		}
		env.requireNoFailures(p)
		if len(first) != scPoolSize {
			env.t.Errorf("%s: warm-up saw %d sessions, want %d", p.name, len(first), scPoolSize)
		}
		if stale > 0 {
			env.t.Errorf("%s: %d first-generation sessions were still used more than %v after warm-up", p.name, stale, maxAge+time.Second)
		}
		if len(later) < scPoolSize {
			env.t.Errorf("%s: %d new sessions replaced the first generation, want >= %d", p.name, len(later), scPoolSize)
		}
		if spread < 50*time.Millisecond {
			env.t.Errorf("%s: the first generation was last used within %v, want replacements spread over >= 50ms", p.name, spread)
		}
		s := env.stats(p)
		p.note += "; " + account(s)
		if n := s.Discards[resilientpg.DiscardMaxAge] + s.ReturnsRejected[resilientpg.DiscardMaxAge]; n < scPoolSize {
			env.t.Errorf("%s: %d connections retired for max age (%s), want >= %d", p.name, n, account(s), scPoolSize)
		}
	}
}
