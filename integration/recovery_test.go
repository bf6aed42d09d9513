package integration

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// recoveryFaults are the restarts and outages TestRecoveryBound runs, one
// after the other, on one server under load: fast and immediate stops,
// started again at once (a restart) or after an outage.
var recoveryFaults = []struct {
	mode   faultlab.StopMode
	outage time.Duration
}{
	{faultlab.StopFast, 0},
	{faultlab.StopImmediate, 0},
	{faultlab.StopFast, time.Second},
	{faultlab.StopImmediate, time.Second},
	{faultlab.StopImmediate, 3 * time.Second},
	{faultlab.StopFast, 3 * time.Second},
}

// recoveryPause is each worker's pause between its queries. Unpaced, the
// load and the race detector keep both CPUs of a small machine busy, and
// then every timer in the test's process, the gate's next probe among
// them, fires up to 100+ ms late: what the first success measured was the
// load generator's own scheduling. Paced (about 5,000 queries a second
// offered), the process has CPU to spare, as a service's should.
const recoveryPause = time.Millisecond

// recoverySettle is how long the load runs on after a fault before the
// next: long enough for the first success to come and the pool to refill.
const recoverySettle = time.Second

// TestRecoveryBound asserts the recovery goal over every kind of restart
// and outage: a wrapper pool under load (8 workers, SELECT 1, each
// pausing recoveryPause between queries, through a faultlab proxy) has its first success within scRecoverBound (100 ms) of
// the server accepting again, the first client seen to get in: a direct
// client polling every 10 ms, or the pool itself. Six faults per engine;
// with fewer than 100, the p99 is the worst of them, which is
// what is asserted.
//
// The pool runs alone against its server, as in the scenario table's
// faults under load (stopStartEach): a bare driver dials thousands of
// times a second, its connects fill the server's accept queue as it comes
// back, and every other client's session waits behind them. The bare
// driver's own figures come from the same faults run with it alone, after
// the wrapper's, on the same server, measured only.
func TestRecoveryBound(t *testing.T) {
	for _, e := range scEngines {
		t.Run(e.name, func(t *testing.T) {
			env := newScEnv(t, e)
			var rows []string
			for _, wrapper := range []bool{true, false} {
				name := e.bare
				if wrapper {
					name = e.wrapper
				}
				pr := env.newProxy(env.srv.addr())
				p := env.openPool(name, wrapper, pr, env.srv.dsn(pr.Addr()))
				env.warm([]*scPool{p}, "SELECT 1")
				stop := env.loadPaced([]*scPool{p}, scLoadWorkers, scMaxOps, selectOne, recoveryPause)
				var lags []time.Duration
				for i, f := range recoveryFaults {
					time.Sleep(recoverySettle)
					lag, note := env.recoveryOnce(p, f.mode, f.outage)
					lags = append(lags, lag)
					if wrapper {
						recordRecovery(t, lag)
					}
					t.Logf("%s fault %d (%v, outage %v): %s", name, i+1, f.mode, f.outage, note)
				}
				time.Sleep(recoverySettle)
				stop()
				p.db.Close()
				worst := slices.Max(lags)
				row := fmt.Sprintf("%-14s first success after the server accepted again, over %d restarts and outages: worst %v, each %s",
					name, len(lags), fmtDur(worst), joinDurs(lags))
				rows = append(rows, row)
				if !wrapper {
					t.Logf("(measured) %s", row)
					continue
				}
				if worst > scRecoverBound {
					t.Errorf("%s: first success up to %v after the server accepted again (each: %s), want <= %v",
						name, worst, joinDurs(lags), scRecoverBound)
				}
			}
			for _, r := range rows {
				t.Logf("recovery, %s: %s", e.name, r)
			}
		})
	}
}

// recoveryOnce stops the server (mode), waits outage, starts it, and
// returns how long after it accepted again p's first success came, with a
// line for the log. A pool without a success within 5 s of the start
// counts as that long.
func (env *scEnv) recoveryOnce(p *scPool, mode faultlab.StopMode, outage time.Duration) (time.Duration, string) {
	env.t.Helper()
	f := scFault{outage: outage > 0}
	f.stopBegin = env.now()
	if err := env.srv.stop(mode); err != nil {
		env.t.Fatalf("stop (%v): %v", mode, err)
	}
	f.stopEnd = env.now()
	upCh := env.srv.watchUp(env.ctx, env.t0)
	time.Sleep(outage)
	f.startBegin = env.now()
	if err := env.srv.start(env.ctx); err != nil {
		env.t.Fatalf("start: %v", err)
	}
	f.startEnd = env.now()
	f.up, f.upConnect = awaitUp(upCh, f.startEnd)
	// Every first success comes within this in practice; the wait is
	// bounded by 5 s after the start either way.
	for i := 0; i < 50 && firstOKAfter(p, f.stopEnd) < 0; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	f.settleIn([]*scPool{p}, f.startEnd)
	first := firstOKAfter(p, f.stopEnd)
	lag := f.recoveryLag(first)
	if first < 0 {
		lag = env.now() - f.in
	}
	return lag, fmt.Sprintf("stop %v..%v, start %v..%v, accepting again at %v (a direct poller's session began at %v and took %v), first success %s",
		fmtDur(f.stopBegin), fmtDur(f.stopEnd), fmtDur(f.startBegin), fmtDur(f.startEnd), fmtDur(f.in), fmtDur(f.up), fmtDur(f.upConnect), "in"+signedMs(lag))
}

func joinDurs(ds []time.Duration) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = fmtDur(d)
	}
	return strings.Join(parts, ", ")
}

// recoveries is every wrapper recovery the suite measured, over every
// restart and outage of a server under a pool with the default settings
// (the scenario table's and TestRecoveryBound's): how long after the
// server accepted again the pool's first success came. Each is asserted
// where it is measured; TestMain reports them together and checks the
// issue's wording, the p99 over all of them.
var recoveries struct {
	mu    sync.Mutex
	marks []recoveryMark
}

type recoveryMark struct {
	test string
	lag  time.Duration
}

func recordRecovery(t testing.TB, lag time.Duration) {
	recoveries.mu.Lock()
	defer recoveries.mu.Unlock()
	recoveries.marks = append(recoveries.marks, recoveryMark{test: t.Name(), lag: lag})
}

// checkRecovery asserts p's first success after fault f within
// scRecoverBound of the server accepting again, and records it.
func (env *scEnv) checkRecovery(p *scPool, f scFault) {
	env.t.Helper()
	first := firstOKAfter(p, f.stopEnd)
	if first < 0 {
		env.t.Errorf("%s: no operation succeeded after the fault", p.name)
		return
	}
	lag := f.recoveryLag(first)
	recordRecovery(env.t, lag)
	if lag > scRecoverBound {
		env.t.Errorf("%s: first success %v after the server accepted again at %v (the first client seen to get in), want <= %v",
			p.name, lag, fmtDur(f.in), scRecoverBound)
	}
}

// reportRecoveries prints the suite's recoveries (and appends them to the
// scenario table's file, if named) and returns false when their p99 is
// above scRecoverBound. Nearest rank: below 100 recoveries the p99 is the
// worst.
func reportRecoveries() bool {
	recoveries.mu.Lock()
	marks := slices.Clone(recoveries.marks)
	recoveries.mu.Unlock()
	if len(marks) == 0 {
		return true
	}
	lags := make([]time.Duration, len(marks))
	for i, m := range marks {
		lags[i] = m.lag
	}
	worst := slices.MaxFunc(marks, func(a, b recoveryMark) int { return int(a.lag - b.lag) })
	p99 := percentile(lags, 99)
	ok := p99 <= scRecoverBound
	verdict := "ok"
	if !ok {
		verdict = "FAIL"
	}
	line := fmt.Sprintf("Recovery (%s): first success after the server accepted again, over the %d restarts and outages the suite ran under wrapper pools: p50 %v, p99 %v (want <= %v), worst %v in %s\n",
		verdict, len(marks), fmtDur(percentile(lags, 50)), fmtDur(p99), scRecoverBound, fmtDur(worst.lag), worst.test)
	fmt.Print(line)
	if path := os.Getenv(envScenarioTable); path != "" {
		if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			_, _ = f.WriteString("\n" + line)
			_ = f.Close()
		}
	}
	return ok
}
