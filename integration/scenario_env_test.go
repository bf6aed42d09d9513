package integration

import (
	"context"
	"database/sql"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg/internal/eventlog"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

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
	// quiet, when set, is shared by scenarios running at once: burst and
	// load hold it shared while they run, and a timed section (timed)
	// holds it alone, so that it times the pools under test and not the
	// other scenarios' load on the same CPUs.
	quiet  *sync.RWMutex
	timing bool // in timed: burst holds quiet already
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

// busy marks a phase that loads the machine, for the scenarios running
// beside this one (see scEnv.quiet); the returned function ends it.
func (env *scEnv) busy() (done func()) {
	if env.quiet == nil || env.timing {
		return func() {}
	}
	env.quiet.RLock()
	return sync.OnceFunc(env.quiet.RUnlock)
}

// timed runs f with no other scenario's burst or load running (see
// scEnv.quiet), and returns how long it waited for them to end.
func (env *scEnv) timed(f func()) (waited time.Duration) {
	if env.quiet == nil {
		f()
		return 0
	}
	start := time.Now()
	env.quiet.Lock()
	defer env.quiet.Unlock()
	waited = time.Since(start)
	env.timing = true
	defer func() { env.timing = false }()
	f()
	return waited
}

// burst runs n operations at concurrency c on every pool at once.
func (env *scEnv) burst(pools []*scPool, n, c int, op scOpFunc) {
	env.t.Helper()
	defer env.busy()()
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
	done := env.busy()
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
			defer done()
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
