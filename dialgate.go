package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
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

// connectCall is what one Connect call knows of its own wait.
type connectCall struct {
	waitingSince time.Time // when this caller first found the server down
	attempts     int       // dials this call made, for the error when it gives up
	waited       bool      // this call waited for another's probe
	counted      bool      // this call is among g.waiters
	held         bool      // this call was held back for other pools
}

// Connect opens an inner connection through the gate and wraps it. While
// the gate is open it dials (dialOpen); otherwise it waits for another
// caller's probe (awaitProbe) or probes itself (probeOnce), until one of
// them gets a connection, the server answers with an error that is not
// worth waiting out, or ctx ends.
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
	call := &connectCall{}
	defer func() {
		if call.counted {
			g.mu.Lock()
			g.waiters--
			if g.waiters == 0 && g.state != gateOpen {
				g.wantDone()
			}
			g.mu.Unlock()
		}
	}()
	for {
		var conn driver.Conn
		var again bool
		var err error
		g.mu.Lock()
		if g.state == gateOpen {
			conn, again, err = c.dialOpen(ctx, call)
		} else {
			conn, again, err = c.notOpen(ctx, call)
		}
		if !again {
			return conn, err
		}
	}
}

// dialOpen dials through the open gate, unless other pools of the server
// still wait for their first connection (then it holds back, and asks to
// be called again). A retryable failure closes the gate and asks to be
// called again, to wait or probe. g.mu is held on entry, and released.
func (c *Connector) dialOpen(ctx context.Context, call *connectCall) (conn driver.Conn, again bool, err error) {
	g := c.gate
	if hold, others := g.fleetHold(time.Now()); hold > 0 {
		// Other pools of this server still wait for their first
		// connection: theirs go first (see serverFleet).
		g.mu.Unlock()
		if !call.held {
			call.held = true
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
			return nil, false, c.waitErr(ctx, call.attempts)
		}
		return nil, true, nil
	}
	g.mu.Unlock()
	call.attempts++
	began := time.Now()
	inner, d, err := c.dial(ctx)
	if err == nil {
		g.dialed(time.Since(began))
		g.fleet.gotIn()
		return c.wrap(inner, d), false, nil
	}
	if isCredentialErr(err) {
		// Nothing reached the server: whatever the function's error
		// wraps (a secret store's refusal, say), the gate stays open.
		return nil, false, err
	}
	if ctx.Err() != nil || !retryableConnect(err) {
		return nil, false, connectErr(err)
	}
	g.fleet.probed(false, false, true)
	g.mu.Lock()
	if g.state != gateDown {
		g.close(err)
	}
	g.mu.Unlock()
	return nil, true, nil
}

// notOpen decides, while the gate is not open, whether this caller fails
// fast, waits for a running probe or probes itself. g.mu is held on
// entry, and released.
func (c *Connector) notOpen(ctx context.Context, call *connectCall) (conn driver.Conn, again bool, err error) {
	g := c.gate
	now := time.Now()
	if g.state == gateDown && call.waitingSince.IsZero() {
		call.waitingSince = now
	}
	if !call.counted {
		call.counted = true
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
	if until := g.fleet.admittingUntil(now); hedgeAt.Before(until) {
		// Another pool of this server just got in: this probe is slow
		// because the server is letting the fleet in, one forked
		// session after another, and a hedge would queue one more.
		hedgeAt = until
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
	impatient := g.state == gateDown && (c.opts.ConnectWait == 0 || now.Sub(call.waitingSince) > c.opts.ConnectWait)
	if impatient && !(due && (g.probing == 0 || hedge)) {
		down := &ServerDownError{Since: g.since, Attempts: call.attempts, Err: g.lastErr}
		g.mu.Unlock()
		c.stats.failedFast.Add(1)
		return nil, false, down
	}
	if g.changed == nil {
		g.changed = make(chan struct{})
	}
	if g.probing > 0 && !hedge {
		var hedgeIn time.Duration              // 0: no hedge timer
		if g.probing < most && g.inTurn == 0 { // else woken when the turn is taken
			hedgeIn = max(hedgeAt.Sub(now), g.notBefore.Sub(now), time.Nanosecond)
			if capped {
				hedgeIn = max(hedgeIn, g.interval/2) // until another pool's overlap ends
			}
		}
		return c.awaitProbe(ctx, call, hedgeIn)
	}
	return c.probeOnce(ctx, call, extra)
}

// awaitProbe waits until a running probe ends, until hedgeIn has passed
// (if not 0: the running probes are slow, and one more may start) or ctx
// ends. g.mu is held on entry, and released.
func (c *Connector) awaitProbe(ctx context.Context, call *connectCall, hedgeIn time.Duration) (conn driver.Conn, again bool, err error) {
	g := c.gate
	ch := g.changed
	var hedge *time.Timer
	var hedgeC <-chan time.Time
	if hedgeIn > 0 {
		hedge = time.NewTimer(hedgeIn)
		hedgeC = hedge.C
	}
	g.mu.Unlock()
	if !call.waited {
		call.waited = true
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
		return nil, false, c.waitErr(ctx, call.attempts)
	}
	return nil, true, nil
}

// probeOnce makes this caller's probe; the others wait for a probe to
// end. The first probe of a connector that is down also waits for its
// turn among the other connectors of the server (see serverFleet). extra
// says it is one of the fleet's overlapping probes of a starting server.
// g.mu is held on entry, and released.
func (c *Connector) probeOnce(ctx context.Context, call *connectCall, extra bool) (conn driver.Conn, again bool, err error) {
	g := c.gate
	now := time.Now()
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

	err = g.fleet.sleep(pctx, wait)
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
		call.attempts++
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
			return c.wrap(inner, d), false, nil
		}
		if ctx.Err() != nil {
			return nil, false, c.waitErr(ctx, call.attempts)
		}
		return nil, true, nil // dial as anyone would now
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
		return c.wrap(inner, d), false, nil
	case isCredentialErr(err):
		// No credentials, so no dial: the probe learnt nothing about the
		// server, and the gate stays as it was for the next one.
		g.mu.Unlock()
		return nil, false, err
	case ctx.Err() != nil:
		g.mu.Unlock()
		return nil, false, c.waitErr(ctx, call.attempts)
	case !retryableConnect(err):
		g.open(run.start) // the server answered, if only to refuse us: it is up
		g.mu.Unlock()
		return nil, false, connectErr(err)
	case g.state == gateSuspect:
		g.close(err)
	default:
		g.fail(err)
	}
	g.mu.Unlock()
	return nil, true, nil
}
