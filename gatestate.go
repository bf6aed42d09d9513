package resilientpg

import (
	"context"
	"log/slog"
	"time"
)

// The connect gate's state changes, made under its lock, and its part
// of a Stats snapshot.

// unavailable closes the gate on a pooler's answer that it has no server
// (PgBouncer's server_login_retry): new connects wait for a probe whose
// round trip gets through, instead of each getting the same refusal.
func (g *dialGate) unavailable(err error) {
	g.mu.Lock()
	g.roundTrip = true
	if g.state != gateDown {
		g.close(err)
	}
	g.mu.Unlock()
}

// suspect is called when a pooled connection lost its server.
func (g *dialGate) suspect() {
	g.mu.Lock()
	if g.state == gateOpen {
		now := time.Now()
		g.state = gateSuspect
		g.suspectAt = now
		g.notBefore = now // probe at once
		g.suspectUntil.Store(now.Add(g.bo.max).UnixNano())
	}
	g.mu.Unlock()
}

// close marks the server down after a retryable dial failure: an outage
// begins, dated from when a pooled connection first lost the server, if
// one did. mu is held.
func (g *dialGate) close(err error) {
	now := time.Now()
	g.since = now
	if g.state == gateSuspect && !g.suspectAt.IsZero() {
		g.since = g.suspectAt
	}
	g.state = gateDown
	g.down.Store(true)
	g.outProbes = 0
	g.startingAt = time.Time{}
	g.genAtClose = g.c.gen.Load()
	g.bo.reset()
	g.fail(err)
	g.c.stats.outages.Add(1)
	g.c.ev.emit(evServerDown, slog.LevelWarn, "resilientpg: server unreachable; connects wait for a probe",
		errAttrs(err)...)
}

// fail records a failed dial and schedules the next probe. mu is held.
func (g *dialGate) fail(err error) {
	g.lastErr = err
	if serverGone(err) {
		g.restarted = true
	}
	now := time.Now()
	g.lastFail = now
	g.notBefore = now.Add(g.nextProbe(err))
	if g.starting(now) {
		// Paced from the newest probe's start, not from this rejection:
		// see maxStartingProbes.
		g.notBefore = g.probeAt.Add(jitterAround(g.interval))
	}
}

// open marks the server up, after a probe that began to dial at start got
// an answer. mu is held. An outage's downtime ends at the midpoint between
// the last failed probe and the first that got through: the server came
// back somewhere in that gap, so the error is at most half a backoff step.
//
// A probe that began before start and is still dialing hangs on something
// the answered one did not (a proxy holding a connect to the server that
// was away): it is called off, and its caller dials like anyone else. One
// that began later dials a server that answers: it goes on, and its
// connection serves its caller, rather than being thrown away half-made
// and dialed again, which on a restarted server busy with a whole fleet's
// connects would double the work in front of every pool's first success.
func (g *dialGate) open(start time.Time) {
	now := time.Now()
	if g.state == gateDown {
		end := g.lastFail.Add(now.Sub(g.lastFail) / 2)
		down := end.Sub(g.since)
		g.c.stats.downNanos.Add(int64(down))
		g.c.ev.emit(evServerUp, slog.LevelInfo, "resilientpg: server reachable again",
			slog.Duration("downtime", down), slog.Int64("probes", g.outProbes))
	}
	if g.state != gateOpen {
		g.recoveredAt = now
	}
	g.wantDone()
	g.state, g.restarted, g.roundTrip, g.lastErr, g.patience = gateOpen, false, false, nil, 0
	g.startingAt = time.Time{}
	for _, r := range g.running {
		if r.start.Before(start) || r.start.After(now) {
			r.stop() // hanging, or still waiting for its time: dial now instead
		}
	}
	g.down.Store(false)
	g.suspectUntil.Store(0)
	g.bo.reset()
}

// sideDialsBlocked reports whether a dial that is not the wrapper's own
// (ctx lacks connectKey), such as a pgx cancel request, should be skipped:
// while the server is known down, or for one backoff cap after a pooled
// connection lost its server, a cancel request for a connection the server
// dropped cannot help and only adds to the storm on a restarting server.
// The window is bounded so that a cancel for a live query, on another
// connection, is not skipped for long.
func (g *dialGate) sideDialsBlocked(ctx context.Context) bool {
	if ctx.Value(connectKey{}) != nil {
		return false
	}
	return g.down.Load() || time.Now().UnixNano() < g.suspectUntil.Load()
}

// stats is the gate's part of a Stats snapshot.
func (g *dialGate) stats(k *counters) GateStats {
	s := GateStats{Outages: k.outages.Load(), Probes: k.probes.Load(), Waited: k.waited.Load(),
		FailedFast: k.failedFast.Load(), Held: k.fleetHeld.Load(), Downtime: time.Duration(k.downNanos.Load())}
	g.mu.Lock()
	switch g.state {
	case gateSuspect:
		s.State = ServerSuspect
	case gateDown:
		s.State = ServerDown
		s.Downtime += time.Since(g.since)
	}
	g.mu.Unlock()
	return s
}
