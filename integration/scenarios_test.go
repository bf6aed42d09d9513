package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg"
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
	// A restart or outage under load runs once per pool (stopStartEach), so
	// its load is shorter: the pools are warm, and 2 s after the server is
	// back leaves over a second past the slowest probe backoff.
	scUnderLoadLead  = time.Second
	scUnderLoadRun   = 4 * time.Second
	scUnderLoadAfter = 2 * time.Second
	scMaxOps         = 200_000 // per worker, a bound that no scenario reaches

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
	scRefusalRate  = 40

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
	// Restart returns once a session got in: the server accepts again.
	in := env.now()
	for _, p := range ps {
		p.note = fmt.Sprintf("fast restart took %v", time.Since(start).Round(time.Millisecond))
	}
	// The wrapper's burst runs alone: two pools dialing a server that has
	// just come up, under -race on two cores, would time each other.
	env.burst(ps[:1], scBurstN, scBurstC, selectOne)
	env.burst(ps[1:], scBurstN, scBurstC, selectOne)
	env.requireNoFailures(ps[0])
	env.checkRecovery(ps[0], scFault{stopEnd: in, in: in})
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
