package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// gateState is what the connector believes about the server.
type gateState uint8

const (
	gateOpen    gateState = iota // dials go straight through
	gateSuspect                  // a pooled conn just lost its server: one probe dials, the others wait for it
	gateDown                     // a dial failed retryably: probes are spaced by backoff
)

// dialGate keeps a connector from hammering a server that is down. While
// the server answers, every Connect dials on its own. When a pooled
// connection reports a disconnect the gate turns suspect: the next Connect
// probes and the others wait for its outcome, so the requests that just
// lost their connections do not all dial a server that may be gone. A
// retryable dial failure closes the gate: one caller at a time probes,
// after a capped, fully jittered backoff, and the others wait for its
// outcome instead of dialing. The first successful probe opens the gate.
type dialGate struct {
	mu        sync.Mutex
	state     gateState     // guarded by mu
	probing   int           // guarded by mu: probes running
	probeAt   time.Time     // guarded by mu: when the newest probe began, or begins, to dial
	changed   chan struct{} // guarded by mu: closed, and replaced, whenever a probe ends
	running   []*probeRun   // guarded by mu: the probes dialing or waiting to
	patience  time.Duration // guarded by mu: the current bound of one probe; see probeTimeout
	notBefore time.Time     // guarded by mu: the next probe waits until then
	since     time.Time     // guarded by mu: when the gate closed
	bo        backoff       // guarded by mu
	lastErr   error         // guarded by mu: the error that closed the gate, or the last probe's
	restarted bool          // guarded by mu: a refusal was seen while down, so recovery means a new server
	roundTrip bool          // guarded by mu: a pooler said it has no server; a probe must get a statement through
	interval  time.Duration // the probe interval after a cheap refusal (Options.ProbeInterval)
	slowDial  time.Duration // guarded by mu: the slowest recent successful dial, decaying; see hedgeAfter

	fleet       *serverFleet // shared with the process's other connectors of this server; nil: none
	wanting     bool         // guarded by mu: counted in fleet.wanting
	waiters     int          // guarded by mu: callers in Connect that met the gate not open
	recoveredAt time.Time    // guarded by mu: when the gate last opened after an outage or a loss; see fleetHold
	inTurn      int          // guarded by mu: probes waiting for their turn among the fleet, not dialing yet

	suspectAt  time.Time  // guarded by mu: when the gate last turned suspect
	lastFail   time.Time  // guarded by mu: the last failed dial while closed
	startingAt time.Time  // guarded by mu: the first "starting up" rejection of the current outage
	outProbes  int64      // guarded by mu: probes in the current outage
	genAtClose uint64     // guarded by mu: the pool generation when the gate closed
	c          *Connector // for counters and events

	down         atomic.Bool  // state == gateDown, for the side-dial check without the lock
	suspectUntil atomic.Int64 // UnixNano: side dials are skipped until then after a disconnect
	dials        atomic.Int64 // every dial Connect made
}

// connectKey marks the context of the wrapper's own dials, so a dial hook
// can tell them from a driver's side dials (pgx's cancel requests).
type connectKey struct{}

// Connect opens an inner connection through the gate and wraps it.
func (c *Connector) Connect(ctx context.Context) (driver.Conn, error) {
	if _, ok := ctx.Deadline(); !ok {
		// database/sql's opener goroutine connects with a context that is
		// never cancelled: the budget is what bounds it.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.ConnectTimeout)
		defer cancel()
	}
	ctx = context.WithValue(ctx, connectKey{}, true)
	g := c.gate
	var waitingSince time.Time // when this caller first found the server down
	attempts := 0              // dials this call made, for the error when it gives up
	waited := false            // this call waited for another's probe
	counted := false           // this call is among g.waiters
	held := false              // this call was held back for other pools
	defer func() {
		if counted {
			g.mu.Lock()
			g.waiters--
			if g.waiters == 0 && g.state != gateOpen {
				g.wantDone()
			}
			g.mu.Unlock()
		}
	}()
	for {
		g.mu.Lock()
		if g.state == gateOpen {
			if hold, others := g.fleetHold(time.Now()); hold > 0 {
				// Other pools of this server still wait for their first
				// connection: theirs go first (see serverFleet).
				g.mu.Unlock()
				if !held {
					held = true
					c.stats.fleetHeld.Add(1)
				}
				t := time.NewTimer(hold)
				select {
				case <-others:
				case <-t.C:
				case <-ctx.Done():
				}
				t.Stop()
				if ctx.Err() != nil {
					return nil, c.waitErr(ctx, attempts)
				}
				continue
			}
			g.mu.Unlock()
			attempts++
			began := time.Now()
			inner, d, err := c.dial(ctx)
			if err == nil {
				g.dialed(time.Since(began))
				g.fleet.gotIn()
				return c.wrap(inner, d), nil
			}
			if isCredentialErr(err) {
				// Nothing reached the server: whatever the function's error
				// wraps (a secret store's refusal, say), the gate stays open.
				return nil, err
			}
			if ctx.Err() != nil || !retryableConnect(err) {
				return nil, connectErr(err)
			}
			g.fleet.probed(false, false, true)
			g.mu.Lock()
			if g.state != gateDown {
				g.close(err)
			}
			g.mu.Unlock()
			continue
		}
		now := time.Now()
		if g.state == gateDown && waitingSince.IsZero() {
			waitingSince = now
		}
		if !counted {
			counted = true
			g.waiters++
		}
		g.wantFirst()
		// A probe may start when none runs (it then waits for its time),
		// or, as a hedge, when the newest one has been dialing for
		// hedgeAfter: a connect held by a proxy in front of a server that
		// is away (HAProxy retries a refused backend for seconds) must not
		// hold up the probe that would find the server back.
		hedgeAt := g.probeAt.Add(g.hedgeAfter())
		most := maxProbes
		starting := g.starting(now)
		if starting {
			// A starting server rejects each probe only after forking a
			// process for it, which takes longer than the interval on a
			// busy machine: probes overlap (a few at most), so that the
			// interval, not that round trip, bounds how late the first
			// probe after it is ready comes. The rate stays one per
			// interval.
			hedgeAt, most = g.probeAt, maxStartingProbes
		}
		due := !now.Before(g.notBefore)
		// A probe waiting for its turn among the fleet is not hanging.
		hedge := g.probing > 0 && g.probing < most && due && !now.Before(hedgeAt) && g.inTurn == 0
		extra, capped := false, false
		if hedge && starting {
			// The overlap, and its pace, are shared by every pool of this
			// server.
			extra = g.fleet.tryExtra(maxStartingProbes, g.interval)
			hedge, capped = extra, !extra
		}
		// Out of patience: fail at once, unless a probe is due, since only
		// a probe can open the gate again.
		impatient := g.state == gateDown && (c.opts.ConnectWait == 0 || now.Sub(waitingSince) > c.opts.ConnectWait)
		if impatient && !(due && (g.probing == 0 || hedge)) {
			err := &ServerDownError{Since: g.since, Attempts: attempts, Err: g.lastErr}
			g.mu.Unlock()
			c.stats.failedFast.Add(1)
			return nil, err
		}
		if g.changed == nil {
			g.changed = make(chan struct{})
		}
		if g.probing > 0 && !hedge {
			ch := g.changed
			var hedge *time.Timer
			var hedgeC <-chan time.Time
			if g.probing < most && g.inTurn == 0 { // else woken when the turn is taken
				d := max(hedgeAt.Sub(now), g.notBefore.Sub(now))
				if capped {
					d = max(d, g.interval/2) // until another pool's overlap ends
				}
				hedge = time.NewTimer(d)
				hedgeC = hedge.C
			}
			g.mu.Unlock()
			if !waited {
				waited = true
				c.stats.waited.Add(1)
			}
			var done bool
			select {
			case <-ch: // a probe ended: the gate is open, or a probe is due
			case <-hedgeC: // the running probes are slow: one more may start
			case <-ctx.Done():
				done = true
			}
			if hedge != nil {
				hedge.Stop()
			}
			if done {
				return nil, c.waitErr(ctx, attempts)
			}
			continue
		}
		// This caller probes; the others wait for a probe to end. The first
		// probe of a connector that is down also waits for its turn among
		// the other connectors of the server (see serverFleet).
		fleetTurn := g.state == gateDown && g.probing == 0 && g.fleet != nil
		if fleetTurn {
			g.inTurn++
		}
		hedgeAfter := g.hedgeAfter()
		wait := g.notBefore.Sub(now)
		g.probing++
		g.probeAt = now.Add(max(wait, 0))
		if g.starting(g.probeAt) {
			g.notBefore = g.probeAt.Add(jitterAround(g.interval)) // the next may start before this one ends
		}
		pctx, stop := context.WithCancel(ctx)
		run := &probeRun{start: g.probeAt, stop: stop, extra: extra}
		g.running = append(g.running, run)
		timeout := g.probeTimeout(c.opts.PingTimeout, c.opts.ConnectTimeout)
		g.mu.Unlock()

		err := g.fleet.sleep(pctx, wait)
		took := false
		if err == nil && fleetTurn {
			took, err = g.fleet.turn(pctx, g.interval, hedgeAfter)
		}
		if fleetTurn {
			// Waiting for the turn was not dialing: a hedge counts from
			// now.
			g.mu.Lock()
			g.inTurn--
			if now := time.Now(); now.After(g.probeAt) {
				g.probeAt = now
			}
			close(g.changed) // the waiters' hedge timers start now
			g.changed = make(chan struct{})
			g.mu.Unlock()
		}
		var inner driver.Conn
		var d dialed
		probed := err == nil
		if probed {
			attempts++
			c.stats.probes.Add(1)
			tctx, cancel := context.WithTimeoutCause(pctx, timeout, probeDeadline(timeout))
			began := time.Now()
			inner, d, err = c.probe(tctx)
			cancel()
			if err == nil {
				g.dialed(time.Since(began))
			}
		}
		stop()
		g.fleet.probed(took, probed && err == nil, probed && err != nil && ctx.Err() == nil && retryableConnect(err))
		g.mu.Lock()
		g.running = slices.DeleteFunc(g.running, func(r *probeRun) bool { return r == run })
		if run.extra {
			g.fleet.endExtra()
		}
		if errors.As(err, new(*connectTimeoutError)) {
			g.patience = min(2*timeout, c.opts.ConnectTimeout)
		}
		g.probing--
		close(g.changed)
		g.changed = make(chan struct{})
		if probed {
			g.outProbes++
		}
		if g.state == gateOpen {
			// Another probe found the server first.
			g.mu.Unlock()
			if err == nil {
				return c.wrap(inner, d), nil
			}
			if ctx.Err() != nil {
				return nil, c.waitErr(ctx, attempts)
			}
			continue // dial as anyone would now
		}
		switch {
		case err == nil:
			if g.restarted {
				// Refused, then accepted: a new server. Connections from before
				// belong to the old one.
				c.invalidate(g.genAtClose, InvalidRestart)
			}
			g.open(run.start)
			g.mu.Unlock()
			return c.wrap(inner, d), nil
		case isCredentialErr(err):
			// No credentials, so no dial: the probe learnt nothing about the
			// server, and the gate stays as it was for the next one.
			g.mu.Unlock()
			return nil, err
		case ctx.Err() != nil:
			g.mu.Unlock()
			return nil, c.waitErr(ctx, attempts)
		case !retryableConnect(err):
			g.open(run.start) // the server answered, if only to refuse us: it is up
			g.mu.Unlock()
			return nil, connectErr(err)
		case g.state == gateSuspect:
			g.close(err)
		default:
			g.fail(err)
		}
		g.mu.Unlock()
	}
}

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

// dial makes one inner connection. With a source of credentials, a
// connect the server refuses after using credentials that were not
// fetched for it (a cached token or file, a call already running) is
// tried once more with fresh ones: they may have been rotated since. The
// refusal itself is an auth error, which never closes the gate.
func (c *Connector) dial(ctx context.Context) (driver.Conn, dialed, error) {
	if c.creds == nil {
		return c.dialOnce(ctx, nil)
	}
	use := &credUse{}
	ctx = context.WithValue(ctx, credKey{}, use)
	conn, d, err := c.dialOnce(ctx, use)
	if err != nil && use.reused && authRefused(err) && ctx.Err() == nil {
		c.creds.refreshes.Add(1)
		*use = credUse{stale: use.seq, force: true}
		conn, d, err = c.dialOnce(ctx, use)
	}
	return conn, d, err
}

// dialOnce makes one connect attempt. For a driver whose connection hides
// its socket (go-sql-driver/mysql), the dial hook hands the socket back
// through ctx, so that checkout can peek at it; the credentials hook hands
// back their expiry through use.
func (c *Connector) dialOnce(ctx context.Context, use *credUse) (driver.Conn, dialed, error) {
	c.gate.dials.Add(1)
	var d dialed
	if c.captureSock {
		ctx = context.WithValue(ctx, sockKey{}, &d.sock)
	}
	start := time.Now()
	d.start = start
	conn, err := c.inner.Connect(ctx)
	c.stats.connectNanos.Add(int64(time.Since(start)))
	err = ownTimeout(ctx, err)
	if err != nil {
		class := Classify(err)
		if isCredentialErr(err) {
			class = ClassAuth // whatever the function's error wraps: no server was asked
		}
		c.stats.connectFailures[class].Add(1)
		if c.ev.enabled(slog.LevelWarn) {
			c.ev.emit(evConnectFailed, slog.LevelWarn, "resilientpg: connect failed", errAttrs(err)...)
		}
	}
	if use != nil {
		d.expires = use.expires
	}
	return conn, d, err
}

// sockKey carries a *net.Conn from dial to the inner driver's dial hook.
type sockKey struct{}

// captureDial wraps a dial function so that it hands its socket, seen
// through a wireConn, to dialOnce.
func captureDial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		wc := newWireConn(nc)
		if p, ok := ctx.Value(sockKey{}).(*net.Conn); ok {
			*p = wc
		}
		return wc, nil
	}
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

// waitErr is the error of a caller whose context ended while the server
// was down: both the context's error and the server's are in the chain.
func (c *Connector) waitErr(ctx context.Context, attempts int) error {
	c.gate.mu.Lock()
	last, since := c.gate.lastErr, c.gate.since
	c.gate.mu.Unlock()
	if last == nil {
		return context.Cause(ctx)
	}
	return &ServerDownError{Since: since, Attempts: attempts, Cause: context.Cause(ctx), Err: last}
}

// connectErr keeps driver.ErrBadConn out of Connect's result, as the
// driver.Connector contract requires: database/sql would take it for a
// failed pooled connection and retry.
func connectErr(err error) error {
	if errors.Is(err, driver.ErrBadConn) {
		return fmt.Errorf("resilientpg: connect: %s", err.Error())
	}
	return err
}
