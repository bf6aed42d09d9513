package resilientpg

// What a failed dial says about the server, and when the gate probes it
// next: the pace by what the failure cost the server, the probes' own
// bounds and hedges.

import (
	"context"
	"database/sql/driver"
	"errors"
	"math/rand/v2"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// probeRun is a probe in flight: when it began, or begins, to dial, and
// how to call it off.
type probeRun struct {
	start time.Time
	stop  context.CancelFunc
	extra bool // an overlapping probe of a starting server, counted in the fleet's extra
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

// maxStartingProbes bounds the probes that overlap while the server starts
// (see startingWindow): one starts every probe interval, and a rejection
// that takes up to three intervals to come back does not slow them.
const maxStartingProbes = 4

// hedgeAfter is how long a probe may dial before another may start beside
// it: far longer than a connect takes on a path that works, and at least
// twice the slowest recent connect. A server that lets sessions in slowly
// because it is busy (a fleet of pools reconnecting to it at once, each
// session a forked process) is not helped by a second probe beside each
// first one: that only doubles its work. A connect held by something in
// the way (HAProxy retrying a dead backend) takes far longer than any
// connect that got through before. mu is held.
func (g *dialGate) hedgeAfter() time.Duration { return max(8*g.interval, 2*g.slowDial) }

// dialed records how long a successful dial took, for hedgeAfter. The
// record decays by an eighth at each dial, so that one slow connect long
// ago does not hold back hedges for good.
func (g *dialGate) dialed(d time.Duration) {
	g.mu.Lock()
	g.slowDial = max(d, g.slowDial-g.slowDial/8)
	g.mu.Unlock()
}

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

// nextProbe is the wait before the probe after a dial that failed with
// err. A refusal costs the server nothing (its kernel answers, or a proxy
// in front of it closes before any server work), so it is probed at a
// short jittered interval and the first probe after the server is back
// comes within about one interval; so is a pooler waiting for its server,
// which answers from its own state. A failover in progress (a live standby
// where a primary is wanted) is probed at four intervals: each probe
// costs the standby a login, and the wait is short; so is a server
// shutting down, which a restart's new one may follow at once. Starting
// up is probed at the interval for a while (see startingWindow).
// Everything else (too many connections, timeouts, TLS or login failures)
// costs the server work: capped exponential backoff with full jitter. mu
// is held.
func (g *dialGate) nextProbe(err error) time.Duration {
	switch probeKindOf(err) {
	case probeCostly:
		if shuttingDown(err) {
			// On its way out, and a restart's new server may follow
			// within a fraction of a second: backed off, the probe that
			// would meet it could sleep through the whole restart.
			return jitterAround(4 * g.interval)
		}
		if startingUp(err) {
			now := time.Now()
			if g.startingAt.IsZero() {
				g.startingAt = now
			}
			if now.Sub(g.startingAt) < startingWindow {
				return jitterAround(g.interval)
			}
		}
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

// startingWindow is how long after its first "starting up" rejection a
// server is probed at the refusal interval. A restart passes through that
// state for a fraction of a second to a few seconds, and each probe costs
// it one forked process that exits before authentication; probed at the
// costly backoff instead, a server that became ready would wait up to a
// backoff step (most of a second) for its clients. Past the window (crash
// recovery replaying a long WAL, a standby that has not reached a
// consistent state) the rejection is backed off like any other.
const startingWindow = time.Second

// starting reports whether the server is down and was last seen starting
// up, within startingWindow of the first sight. mu is held.
func (g *dialGate) starting(now time.Time) bool {
	return g.state == gateDown && !g.startingAt.IsZero() && now.Sub(g.startingAt) < startingWindow
}

// startingUp reports whether err is PostgreSQL's refusal of a session
// while the server starts or recovers and will accept soon (SQLSTATE
// 57P03: "starting up", "in recovery mode", "not yet accepting
// connections"). Shutting down and a standby without hot_standby ("not
// accepting connections") are not: neither will accept sessions soon.
func startingUp(err error) bool {
	pe, ok := asType[*pgconn.PgError](err)
	if !ok || pe.Code != "57P03" {
		return false
	}
	m := pe.Message
	return strings.Contains(m, "starting up") || strings.Contains(m, "in recovery mode") ||
		strings.Contains(m, "not yet accepting connections")
}

// shuttingDown reports whether err is a server's refusal of a session
// while it shuts down (PostgreSQL 57P03 "shutting down", MariaDB 1053).
func shuttingDown(err error) bool {
	if pe, ok := asType[*pgconn.PgError](err); ok {
		return pe.Code == "57P03" && strings.Contains(pe.Message, "shutting down")
	}
	if me, ok := asType[*mysql.MySQLError](err); ok {
		return me.Number == 1053
	}
	return false
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
