package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Errors a checkout returns when it discards a connection. Each wraps
// driver.ErrBadConn: database/sql ignores any other ResetSession error and
// would run the query on the condemned connection.
var (
	ErrMarkedBad    = fmt.Errorf("resilientpg: connection marked bad: %w", driver.ErrBadConn)
	ErrMaxAge       = fmt.Errorf("resilientpg: connection past its max age: %w", driver.ErrBadConn)
	ErrMaxIdle      = fmt.Errorf("resilientpg: connection idle past max idle time: %w", driver.ErrBadConn)
	ErrServerClosed = fmt.Errorf("resilientpg: server closed the idle connection: %w", driver.ErrBadConn)
	ErrLeftInTx     = fmt.Errorf("resilientpg: connection closed or left inside a transaction: %w", driver.ErrBadConn)
	ErrInvalidated  = fmt.Errorf("resilientpg: connection older than a server restart or failover: %w", driver.ErrBadConn)
)

// peekAfterIdle is the idle time below which checkout skips the socket
// peek. A connection returned less than this ago can only hold a farewell
// the server sent and the network delivered inside that gap; under load,
// when connections are reused within microseconds, the peek's syscall would
// be most of the wrapper's cost and almost never see anything. The
// exceptions follow a statement that lost its server on another
// connection (Connector.lostAt): see lossPeekWindow.
const peekAfterIdle = time.Millisecond

// lossPeekWindow is how long after a statement lost its connection every
// checkout peeks, however briefly idle the connection. A crash or an
// immediate shutdown ends the server's sessions one by one over tens of
// milliseconds on a busy machine: a connection that served a statement
// after the first loss may have lost its own server a moment later, and
// without the peek the next statement would be sent into it and fail in
// flight. A connection returned before the loss is pinged too (under the
// default policy), since its end may not have reached its socket yet. The
// peek is one non-blocking syscall; a pool that lost nothing pays nothing.
//
// When the server itself ended the session (a shutdown's or
// pg_terminate_backend's 57P01: the two cannot be told apart), every
// checkout in the window pings, even of a connection returned after the
// loss: a fast shutdown signals every backend at once, but on a busy
// machine each acts on it only when next scheduled, so a connection whose
// socket is still clean at checkout may be ended a moment later, with the
// statement sent to it. The ping's round trip waits for that backend to
// run: it either answers, and the backend is not ending, or its farewell
// discards the connection before any statement. Without it a worker
// whose statement failed at the stop could lose its next one as well (a
// planned switchover under 8 workers: 9 failed writes, not 8). The cost is
// a round trip per checkout for one second after such an end.
const lossPeekWindow = time.Second

// ResetSession runs at every checkout of a used connection, cheapest check
// first, and returns an error wrapping driver.ErrBadConn to have
// database/sql discard the connection and take another (it does so up to
// three times per operation, the last time with a brand-new connection, so
// no retry loop is needed here):
//
//  1. marked bad, retired by a pool-wide invalidation, past max age, idle
//     past max idle time: discard, no I/O;
//  2. a non-blocking peek at the socket, if idle at least peekAfterIdle
//     or within lossPeekWindow of a statement losing its connection:
//     closed or holding a server's farewell error: discard; holding other
//     data: ping;
//  3. closed or left inside a transaction (pgx), then the inner driver's
//     reset (mysql: its own socket read);
//  4. a round-trip ping if the policy says one is due (PingIdle: idle past
//     PingIdle, returned before a statement on another connection lost
//     its server, or within lossPeekWindow of the server ending a
//     statement's session), bounded by the smaller of the caller's
//     deadline and PingTimeout.
//
// If the caller's ctx ends, its error is returned and a healthy connection
// is kept: database/sql then fails the caller's operation, not the conn.
func (c *conn) ResetSession(ctx context.Context) error {
	c.c.stats.checkouts.Add(1)
	c.fresh = false
	if c.bad.Load() {
		return c.discard(DiscardMarkedBad, ErrMarkedBad)
	}
	if c.gen != c.c.gen.Load() {
		return c.discard(DiscardInvalidated, ErrInvalidated)
	}
	if c.txOpen { // database/sql hands out a conn only after its transaction ended
		c.txOpen = false
		c.txFlag.Store(false)
	}
	now := time.Now()
	if c.life.expired(now) {
		return c.discard(DiscardMaxAge, ErrMaxAge)
	}
	idle := now.Sub(c.lastActive)
	o := &c.c.opts
	if o.MaxIdleTime > 0 && idle > o.MaxIdleTime {
		return c.discard(DiscardMaxIdle, ErrMaxIdle)
	}
	// Returned before a statement on another connection lost its server:
	// this one may be on its way out too (a shutdown ends sessions one by
	// one; a crashed primary's take a moment to die), with nothing to see
	// on its socket yet. A ping that fails costs nothing but the ping; a
	// statement that fails was in flight and is lost.
	lostAt := c.c.lostAt.Load()
	afterLoss := c.lastActive.UnixNano() <= lostAt
	ending := now.UnixNano()-c.c.endAt.Load() < int64(lossPeekWindow)
	ping := o.Ping == PingAlways || (o.Ping == PingIdle && (idle >= o.PingIdle || afterLoss || ending))
	if c.sock != nil && (idle >= peekAfterIdle || afterLoss || now.UnixNano()-lostAt < int64(lossPeekWindow)) {
		switch st := c.sock.check(); st {
		case sockClosed, sockFatal, sockDeadPath:
			c.bad.Store(true)
			if st == sockDeadPath {
				c.deadPath.Store(true) // the server may not know: reap its session
			}
			c.c.gate.suspect()
			if c.c.everySessionEnded(c, now) {
				// A shutdown or restart ended them all: retire the pool
				// now rather than find each one dead in turn.
				c.c.invalidate(c.gen, InvalidShutdown)
				return c.discard(DiscardInvalidated, ErrInvalidated)
			}
			return c.discard(DiscardServerClosed, ErrServerClosed)
		case sockPending:
			ping = true // a notification or a farewell: only a round trip tells
		}
	}
	if c.pg != nil && (c.pg.IsClosed() || c.pg.TxStatus() != 'I') {
		c.bad.Store(true)
		return c.discard(DiscardLeftInTx, ErrLeftInTx) // closed conns were caught by the socket check
	}
	if c.resetter != nil {
		if err := c.resetter.ResetSession(ctx); err != nil {
			if errors.Is(err, driver.ErrBadConn) {
				c.bad.Store(true)
				return c.discard(DiscardDriverReset, fmt.Errorf("resilientpg: driver reset: %w", err))
			}
			return err
		}
	}
	if ping {
		if err := c.ping(ctx); err != nil {
			return err
		}
	}
	c.lastActive = now
	c.markOut(now)
	return nil
}

// discard counts a checkout's rejection and returns its error, which wraps
// driver.ErrBadConn.
func (c *conn) discard(r DiscardReason, err error) error {
	c.c.stats.discards[r].Add(1)
	if c.c.ev.enabled(slog.LevelDebug) {
		c.logDiscard(r, "checkout")
	}
	return err
}

func (c *conn) logDiscard(r DiscardReason, at string) {
	now := time.Now()
	c.c.ev.emit(evConnDiscarded, slog.LevelDebug, "resilientpg: connection discarded",
		slog.String("reason", r.String()), slog.String("at", at), slog.Int64("conn", c.id),
		slog.Duration("age", now.Sub(c.born)), slog.Duration("idle", now.Sub(c.lastActive)))
}

// ping makes one bounded round trip. pgx is pinged through pgconn to keep
// the real error (stdlib's Ping replaces it with a bare ErrBadConn).
func (c *conn) ping(ctx context.Context) error {
	if c.pg == nil && c.pinger == nil {
		return nil // the driver offers no ping; nothing to bound
	}
	if err := ctx.Err(); err != nil {
		return err // the caller gave up before we started: keep the conn
	}
	k := &c.c.stats
	k.pings.Add(1)
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, c.c.opts.PingTimeout)
	var err error
	if c.pg != nil {
		err = c.pg.Ping(pctx)
	} else {
		err = c.pinger.Ping(pctx)
	}
	cancel()
	took := int64(time.Since(start))
	k.pingNanos.Add(took)
	maxInto(&k.pingMaxNano, took)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil && c.usable() {
		return ctx.Err() // the caller's deadline, not the conn, ended the ping
	}
	k.pingFailures.Add(1)
	c.bad.Store(true)
	if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) || deadPathErr(err) {
		// No answer within PingTimeout (the caller's own deadline was ruled
		// out above): the path, or the server, is gone, and the session
		// may live on.
		c.deadPath.Store(true)
	}
	if cause, ok := serverWide(err); ok {
		c.c.invalidate(c.gen, cause) // a crash ends every session, not just this one
	}
	return c.discard(DiscardPingFailed, fmt.Errorf("resilientpg: checkout ping: %w: %w", driver.ErrBadConn, err))
}

// usable reports whether the inner conn survived an interrupted operation:
// pgconn closes a conn whose I/O was cancelled; mysql closes it too and says
// so through IsValid.
func (c *conn) usable() bool {
	switch {
	case c.pg != nil:
		return !c.pg.IsClosed()
	case c.validator != nil:
		return c.validator.IsValid()
	}
	return false // cannot tell: do not keep a conn that may be broken
}

// IsValid runs every time database/sql puts the conn back in the pool. It
// is truthful: a conn marked bad, past its max age, closed, or still inside
// a transaction (a rollback that failed after a cancelled ctx) is not valid.
// It also stamps the return time, from which checkout measures idleness.
func (c *conn) IsValid() bool {
	now := time.Now()
	c.markBack(now)
	c.fresh = false
	if r, ok := c.rejectAtReturn(now); !ok {
		c.c.stats.returnsRejected[r].Add(1)
		if c.c.ev.enabled(slog.LevelDebug) {
			c.logDiscard(r, "return")
		}
		return false
	}
	c.lastActive = now
	if c.txOpen {
		c.txOpen = false
		c.txFlag.Store(false)
	}
	return true
}

// rejectAtReturn says whether the conn may go back to the pool, and if not
// why.
func (c *conn) rejectAtReturn(now time.Time) (DiscardReason, bool) {
	switch {
	case c.bad.Load():
		return DiscardMarkedBad, false
	case c.gen != c.c.gen.Load():
		return DiscardInvalidated, false
	case c.life.expired(now):
		return DiscardMaxAge, false
	case c.pg != nil && (c.pg.IsClosed() || c.pg.TxStatus() != 'I'):
		return DiscardLeftInTx, false
	case c.validator != nil && !c.validator.IsValid():
		return DiscardDriverReset, false
	}
	return 0, true
}

// everySessionEnded reports whether, beside dead, every other idle
// connection of its generation has been closed or ended by the server too:
// a shutdown or restart (a fast PostgreSQL shutdown sends each session the
// same 57P01 that pg_terminate_backend sends one), or an administrator
// ending them all. It peeks at their sockets, which costs a syscall each
// and runs only on this failure path.
//
// Only connections the event could have touched count: idle ones made
// before the first of this wave of dead connections was found (a
// replacement made since says nothing). One already marked bad counts as
// ended.
func (c *Connector) everySessionEnded(dead *conn, now time.Time) bool {
	// A concurrent checkout may have found them all ended and retired the
	// pool, before or during this scan.
	retired := func() bool { return c.gen.Load() != dead.gen }
	if retired() {
		return true
	}
	wave := c.deadWave(dead.gen, now)
	ended := 0
	c.track.mu.Lock()
	defer c.track.mu.Unlock()
	for w := range c.track.conns {
		if w == dead || w.gen != dead.gen || w.sock == nil || !w.born.Before(wave) || w.out.since.Load() != 0 {
			continue
		}
		if w.bad.Load() {
			ended++
			continue
		}
		switch st := w.sock.peekOther(); st {
		case sockClosed, sockFatal, sockDeadPath:
			if st == sockDeadPath {
				w.deadPath.Store(true) // the kernel reports it once: remember it for the reaper
			}
			ended++
		default:
			return retired() // one is alive: only some sessions ended
		}
	}
	return ended > 0 || retired()
}

// deadWave returns when the current wave of connections found dead at
// checkout began: the first such find in dead's generation, unless that
// was over a second ago. A wave ends with its generation, so a pool retired
// by one event starts afresh at the next.
func (c *Connector) deadWave(gen uint64, now time.Time) time.Time {
	w := &c.track.wave
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.at.IsZero() || w.gen != gen || now.Sub(w.at) >= time.Second {
		w.gen, w.at = gen, now
	}
	return w.at
}
