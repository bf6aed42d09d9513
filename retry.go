package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// backoff is capped exponential backoff with full jitter: the n-th wait is
// drawn uniformly from [0, min(max, initial*2^n)], which spreads clients
// that failed together (AWS "Exponential Backoff And Jitter"). It is a
// per-use value, not safe for concurrent use.
type backoff struct {
	initial, max time.Duration
	attempt      int
}

func (b *backoff) next() time.Duration {
	ceil := b.max
	if b.attempt < 62 && b.initial<<b.attempt > 0 && b.initial<<b.attempt < b.max {
		ceil = b.initial << b.attempt // the checks above clamp the shift's overflow
	}
	b.attempt++
	return time.Duration(rand.Int64N(int64(ceil) + 1))
}

func (b *backoff) reset() { b.attempt = 0 }

// sleepCtx waits d or until ctx ends, with one timer.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// retryableConnect reports whether a failed connect may be tried again.
// Ordered guards, net/http style.
func retryableConnect(err error) bool {
	switch Classify(err) {
	case ClassCannotConnect:
		return true // refused, starting up, too many connections: it may heal soon
	case ClassConnLost, ClassShutdown:
		return true // reset during the handshake, or the server is going down: same
	case ClassCanceled:
		return false // the caller gave up
	case ClassAuth:
		return false // wrong credentials or database: retrying only delays the error
	}
	return false // conservatively: configuration, TLS, unknown errors fail at once
}

// RetryPolicy says which failed statements the wrapper may have
// database/sql run again on another connection.
type RetryPolicy uint8

const (
	// RetrySafe retries only what provably did not execute: a statement
	// rejected by a read-only server outside a transaction, or one the
	// caller marked idempotent with WithIdempotent.
	RetrySafe RetryPolicy = iota
	// RetryOff turns the wrapper's own retries off. database/sql still
	// retries what the inner driver reports as driver.ErrBadConn (nothing
	// was sent).
	RetryOff
)

func (p RetryPolicy) String() string {
	if p == RetryOff {
		return "off"
	}
	return "safe"
}

type idempotentKey struct{}

// WithIdempotent marks the statements run with ctx as safe to run twice
// (a SELECT, an upsert, an insert with a unique key the caller checks). A
// statement so marked that loses its connection mid-flight, outside a
// transaction, is retried on another connection; unmarked, it fails,
// because the server may have executed it.
func WithIdempotent(ctx context.Context) context.Context {
	return context.WithValue(ctx, idempotentKey{}, true)
}

func isIdempotent(ctx context.Context) bool {
	v, _ := ctx.Value(idempotentKey{}).(bool)
	return v
}

// retryStatement decides whether a statement that failed with err may be
// run again on another connection, that is, whether the wrapper may report
// driver.ErrBadConn to database/sql, and says why. A write must never run
// twice: when in doubt, do not retry.
func (c *conn) retryStatement(ctx context.Context, err error, class Class, inTx bool) RetryReason {
	if c.c.opts.Retry == RetryOff {
		return ReasonRetryOff // the user turned the wrapper's retries off
	}
	if inTx {
		return ReasonInTx // earlier statements of the transaction ran on this connection: only the caller can rerun it whole
	}
	if pgconn.SafeToRetry(err) {
		return ReasonNotSent // pgconn proves nothing was sent
	}
	if poolerRetryLater(err) {
		return ReasonUnavailable // the pooler had no server to send it to
	}
	if class == ClassReadOnly && c.c.rejectReadOnly {
		return ReasonReadOnly // rejected by a demoted primary: not executed
	}
	if isIdempotent(ctx) && (class == ClassConnLost || class == ClassShutdown || class == ClassSessionTimeout) {
		return ReasonIdempotent // ambiguous, but the caller vouched it may run twice
	}
	return ReasonMayHaveRun // conservatively: it may have executed
}

// handleErr runs on every failed statement: it marks the connection bad on
// a disconnect, invalidates the pool on a server-wide event, and turns the
// error into a retry (wrapping driver.ErrBadConn) only when retryStatement
// allows it. An error that says the connection failed comes back as a
// *StatementError that tells the caller whether and why it was retried;
// any other error (a syntax error, a constraint violation) is returned as
// it is. The original error stays in the chain for errors.Is/As.
func (c *conn) handleErr(ctx context.Context, err error, inTx bool) error {
	class := Classify(err)
	c.c.stats.statementFailures[class].Add(1)
	readOnlyFailover := class == ClassReadOnly && c.c.rejectReadOnly
	cause, wide := serverWide(err)
	switch {
	case poolerRetryLater(err):
		// PgBouncer has no server for now (its server_login_retry after a
		// failed login): it closes this connection, and a new one would get
		// the same answer until a statement gets through, so connects wait
		// at the gate for a probe that makes a round trip.
		c.bad.Store(true)
		c.c.gate.unavailable(err)
	case readOnlyFailover:
		// A demoted primary: every connection made before now may point at
		// it, so the pool reconnects (multi-host DSNs then find the new one).
		c.bad.Store(true)
		c.c.invalidate(c.gen, InvalidReadOnly)
	case wide:
		c.bad.Store(true)
		c.c.invalidate(c.gen, cause)
	case class == ClassConnLost || class == ClassShutdown:
		c.bad.Store(true)
		c.c.lost(time.Now(), class == ClassShutdown)
		if deadPathErr(err) {
			c.deadPath.Store(true) // a TCP user timeout or keepalive: the server may not know
		}
	case class == ClassSessionTimeout:
		c.bad.Store(true)
	case c.c.creds != nil && privilegeRevoked(err):
		// Credentials rotate: a role that lost its rights is an old
		// lease's, and a new connection logs in with the current one.
		c.bad.Store(true)
	case c.pg != nil && c.pg.IsClosed():
		c.bad.Store(true)
	}
	if errors.Is(err, driver.ErrBadConn) {
		// Already a retry, by the driver's own proof (pgx stdlib for
		// SafeToRetry errors, mysql when nothing was written).
		c.bad.Store(true)
		c.c.stats.retries[ReasonNotSent].Add(1)
		ret := &StatementError{Class: class, Reason: ReasonNotSent, Err: err}
		if c.tx.active && inTx {
			return c.noteTxFailure(err, ret)
		}
		return ret
	}
	reason := c.retryStatement(ctx, err, class, inTx)
	ret := err
	if reason.Retried() || readOnlyFailover || IsDisconnect(err) {
		c.c.stats.retries[reason].Add(1)
		ret = &StatementError{Class: class, Reason: reason, Err: err}
	}
	if c.tx.active && inTx {
		return c.noteTxFailure(err, ret)
	}
	return ret
}
