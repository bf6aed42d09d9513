package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
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
	mu         sync.Mutex
	state      gateState          // guarded by mu
	probing    int                // guarded by mu: probes running
	probeAt    time.Time          // guarded by mu: when the newest probe began, or begins, to dial
	changed    chan struct{}      // guarded by mu: closed, and replaced, whenever a probe ends
	opened     context.Context    // guarded by mu: ends when the gate opens; running probes stop then
	openProbes context.CancelFunc // guarded by mu: ends opened
	patience   time.Duration      // guarded by mu: the current bound of one probe; see probeTimeout
	notBefore  time.Time          // guarded by mu: the next probe waits until then
	since      time.Time          // guarded by mu: when the gate closed
	bo         backoff            // guarded by mu
	lastErr    error              // guarded by mu: the error that closed the gate, or the last probe's
	restarted  bool               // guarded by mu: a refusal was seen while down, so recovery means a new server
	roundTrip  bool               // guarded by mu: a pooler said it has no server; a probe must get a statement through
	interval   time.Duration      // the probe interval after a cheap refusal (Options.ProbeInterval)

	suspectAt  time.Time  // guarded by mu: when the gate last turned suspect
	lastFail   time.Time  // guarded by mu: the last failed dial while closed
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
	for {
		g.mu.Lock()
		if g.state == gateOpen {
			g.mu.Unlock()
			attempts++
			inner, d, err := c.dial(ctx)
			if err == nil {
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
		// A probe may start when none runs (it then waits for its time),
		// or, as a hedge, when the newest one has been dialing for
		// hedgeAfter: a connect held by a proxy in front of a server that
		// is away (HAProxy retries a refused backend for seconds) must not
		// hold up the probe that would find the server back.
		hedgeAt := g.probeAt.Add(g.hedgeAfter())
		due := !now.Before(g.notBefore)
		hedge := g.probing > 0 && g.probing < maxProbes && due && !now.Before(hedgeAt)
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
			if g.probing < maxProbes {
				hedge = time.NewTimer(max(hedgeAt.Sub(now), g.notBefore.Sub(now)))
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
		// This caller probes; the others wait for a probe to end.
		wait := g.notBefore.Sub(now)
		g.probing++
		g.probeAt = now.Add(max(wait, 0))
		if g.opened == nil {
			g.opened, g.openProbes = context.WithCancel(context.Background())
		}
		// A probe still hanging when another found the server back is
		// called off: its caller then dials like anyone else.
		pctx, stop := context.WithCancel(ctx)
		stopOnOpen := context.AfterFunc(g.opened, stop)
		timeout := g.probeTimeout(c.opts.PingTimeout, c.opts.ConnectTimeout)
		g.mu.Unlock()

		err := sleepCtx(pctx, wait)
		var inner driver.Conn
		var d dialed
		probed := err == nil
		if probed {
			attempts++
			c.stats.probes.Add(1)
			tctx, cancel := context.WithTimeoutCause(pctx, timeout, probeDeadline(timeout))
			inner, d, err = c.probe(tctx)
			cancel()
		}
		stopOnOpen()
		stop()
		g.mu.Lock()
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
			g.open()
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
			g.open() // the server answered, if only to refuse us: it is up
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

// probeTimeout bounds one probe. A connect can hang without the server
// being involved at all: HAProxy holds a connect to a backend that just
// died while it retries it (retries 3, a second apart, by default), and
// the probe that would find the new primary must not wait behind that. A
// probe therefore gets the checkout ping's bound, doubled after each one
// that ran out of it (up to resilient_connect_timeout), so that a server
// that takes seconds to accept (a serverless one resuming) is still
// reached. mu is held.
func (g *dialGate) probeTimeout(initial, most time.Duration) time.Duration {
	if g.patience == 0 {
		g.patience = min(initial, most)
	}
	return g.patience
}

// probeDeadline is the cause of a probe's context when its own bound, not
// the caller's deadline, ended it.
type probeDeadline time.Duration

func (p probeDeadline) Error() string {
	return "resilientpg: probe bound of " + time.Duration(p).String() + " reached"
}

// ownTimeout marks a connect error that came from a connect's own bound,
// not the caller's deadline: pgx's connect_timeout per host while ctx is
// alive, or a probe's bound (the cause of ctx).
func ownTimeout(ctx context.Context, err error) error {
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if bound, ok := context.Cause(ctx).(probeDeadline); ok {
		return &connectTimeoutError{timeout: time.Duration(bound), err: err}
	}
	if ctx.Err() == nil {
		return &connectTimeoutError{err: err}
	}
	return err
}

// connectTimeoutError is a connect that ran out of its own bound (a
// probe's, or pgx's connect_timeout per host) while the caller's context
// still had time: the address did not answer in time, which says nothing
// about the caller and is retried like a refusal.
type connectTimeoutError struct {
	timeout time.Duration // 0: pgx's connect_timeout
	err     error
}

func (e *connectTimeoutError) Error() string {
	if e.timeout == 0 {
		return "resilientpg: connect timed out: " + e.err.Error()
	}
	return "resilientpg: connect timed out after " + e.timeout.String() + ": " + e.err.Error()
}
func (e *connectTimeoutError) Unwrap() error { return e.err }

// maxProbes bounds the probes a connector runs at once: one, plus hedges
// while the running ones hang (see Connect).
const maxProbes = 16

// hedgeAfter is how long a probe may dial before another may start beside
// it: far longer than a connect takes on a path that works.
func (g *dialGate) hedgeAfter() time.Duration { return 8 * g.interval }

// probe is the dial of a probe. While a pooler has said it has no server,
// the pooler itself accepts connects, so the probe also makes a round
// trip: only a statement that gets through shows a server behind it.
func (c *Connector) probe(ctx context.Context) (driver.Conn, dialed, error) {
	inner, d, err := c.dial(ctx)
	if err != nil {
		return nil, d, err
	}
	c.gate.mu.Lock()
	rt := c.gate.roundTrip
	c.gate.mu.Unlock()
	if rt {
		if err := roundTrip(ctx, inner); err != nil {
			inner.Close()
			return nil, d, ownTimeout(ctx, err)
		}
	}
	return inner, d, nil
}

// roundTrip makes one round trip on a new inner connection: pgx's empty
// statement, or the driver's Ping.
func roundTrip(ctx context.Context, inner driver.Conn) error {
	if sc, ok := UnwrapConn(inner).(*stdlib.Conn); ok {
		return sc.Conn().PgConn().Ping(ctx)
	}
	if p, ok := inner.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
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
}

// nextProbe is the wait before the probe after a dial that failed with
// err. A refusal costs the server nothing (its kernel answers, or a proxy
// in front of it closes before any server work), so it is probed at a
// short jittered interval and the first probe after the server is back
// comes within about one interval; so is a pooler waiting for its server,
// which answers from its own state. A failover in progress (a live standby
// where a primary is wanted) is probed at four intervals: each probe
// costs the standby a login, and the wait is short. Everything else (starting up, too many connections, timeouts,
// TLS or login failures) costs the server work: capped exponential
// backoff with full jitter. mu is held.
func (g *dialGate) nextProbe(err error) time.Duration {
	switch probeKindOf(err) {
	case probeRefused:
		// The process that rejected at a cost is gone (a restart: "shutting
		// down", refused, "starting up"): the next rejection opens a new
		// episode, and must not wait out the old one's backoff.
		g.bo.reset()
		return jitterAround(g.interval)
	case probeSoon:
		return jitterAround(4 * g.interval)
	}
	return g.bo.next()
}

// jitterAround draws a wait uniformly from [d/2, 3d/2]: it averages d, so
// the probe rate is bounded, and clients that failed together drift apart.
func jitterAround(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d)+1))
}

// probeKind sorts a failed dial by what probing again costs the server.
type probeKind uint8

const (
	probeCostly  probeKind = iota // the server did work to refuse: back off
	probeRefused                  // refused or closed before any server work: probe often
	probeSoon                     // a failover: probe soon, not often
)

func probeKindOf(err error) probeKind {
	if _, ok := asType[*connectTimeoutError](err); ok {
		return probeRefused // held by something in the way, or black-holed: no server work
	}
	if _, ok := asType[*targetMismatchError](err); ok {
		return probeSoon // a live server of the wrong role: its peer may be promoted any moment
	}
	if poolerRetryLater(err) {
		return probeRefused // the pooler answers from its own state: no server work
	}
	if _, ok := asType[*pgconn.PgError](err); ok {
		return probeCostly // the server answered: a backend started, refused, ended
	}
	if _, ok := asType[*mysql.MySQLError](err); ok {
		return probeCostly
	}
	if errors.Is(err, syscall.ECONNREFUSED) || Classify(err) == ClassConnLost && !isTimeout(err) {
		return probeRefused // nothing listens, or a proxy with nothing behind it closed the socket
	}
	return probeCostly // timeouts, TLS, anything unknown
}

// isTimeout reports whether err is a timeout of some kind: a black-holed
// address costs each probe a whole timeout, so it is not probed often.
func isTimeout(err error) bool {
	if errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	ne, ok := asType[net.Error](err)
	return ok && ne.Timeout()
}

// serverGone reports whether a failed dial shows the server process itself
// away or changing: refused, reset or closed during the handshake (what a
// proxy or load balancer in front of a stopped server does), starting up or
// shutting down. "Too many connections" does not: the same server is still
// there, and so is every pooled connection to it.
func serverGone(err error) bool {
	if errors.Is(err, syscall.ECONNREFUSED) || Classify(err) == ClassConnLost {
		return true
	}
	if pe, ok := asType[*pgconn.PgError](err); ok {
		return pe.Code == "57P03" || pe.Code == "57P01" || pe.Code == "57P02"
	}
	if me, ok := asType[*mysql.MySQLError](err); ok {
		return me.Number == 1053
	}
	return false
}

// open marks the server up. mu is held. An outage's downtime ends at the
// midpoint between the last failed probe and the first that got through:
// the server came back somewhere in that gap, so the error is at most half
// a backoff step.
func (g *dialGate) open() {
	if g.state == gateDown {
		now := time.Now()
		end := g.lastFail.Add(now.Sub(g.lastFail) / 2)
		down := end.Sub(g.since)
		g.c.stats.downNanos.Add(int64(down))
		g.c.ev.emit(evServerUp, slog.LevelInfo, "resilientpg: server reachable again",
			slog.Duration("downtime", down), slog.Int64("probes", g.outProbes))
	}
	g.state, g.restarted, g.roundTrip, g.lastErr, g.patience = gateOpen, false, false, nil, 0
	if g.opened != nil {
		g.openProbes()
		g.opened, g.openProbes = nil, nil
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

// captureDial wraps a dial function so that it hands its socket to dial.
func captureDial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if p, ok := ctx.Value(sockKey{}).(*net.Conn); ok && err == nil {
			*p = nc
		}
		return nc, err
	}
}

// stats is the gate's part of a Stats snapshot.
func (g *dialGate) stats(k *counters) GateStats {
	s := GateStats{Outages: k.outages.Load(), Probes: k.probes.Load(), Waited: k.waited.Load(),
		FailedFast: k.failedFast.Load(), Downtime: time.Duration(k.downNanos.Load())}
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
