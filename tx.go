package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// TxBeginner is what RunTx runs transactions on: *sql.DB and *sql.Conn.
type TxBeginner interface {
	BeginTx(ctx context.Context, opts *sql.TxOptions) (*sql.Tx, error)
}

var (
	_ TxBeginner = (*sql.DB)(nil)
	_ TxBeginner = (*sql.Conn)(nil)
)

// TxOption tunes RunTx.
type TxOption func(*txConfig)

type txConfig struct {
	attempts     int
	initial, max time.Duration
	unique       bool
	extra        []string // SQLSTATEs or MySQL error numbers, as text
}

// Defaults: serialization failures and deadlocks clear as soon as the
// winner commits, usually within milliseconds, so the first waits are
// short; ten attempts with waits growing to 500 ms (full jitter) cover a
// burst of contention, and cost at most about 2.5 s in all, less than most
// request deadlines, which bound RunTx anyway.
const (
	defaultTxAttempts = 10
	defaultTxBackoff  = 5 * time.Millisecond
	defaultTxMax      = 500 * time.Millisecond
)

// TxAttempts sets how many times RunTx may run the transaction in all
// (default 10); n < 1 means 1.
func TxAttempts(n int) TxOption {
	return func(c *txConfig) { c.attempts = max(n, 1) }
}

// TxBackoff sets the waits between attempts: capped exponential from
// initial to max, fully jittered (default 5 ms to 500 ms).
func TxBackoff(initial, max time.Duration) TxOption {
	return func(c *txConfig) { c.initial, c.max = initial, max }
}

// TxRetryOn adds error codes on which the whole transaction is run again:
// PostgreSQL SQLSTATEs ("55P03") or MySQL error numbers ("3572").
func TxRetryOn(codes ...string) TxOption {
	return func(c *txConfig) { c.extra = append(c.extra, codes...) }
}

// TxRetryUniqueViolation runs the transaction again on a unique-key
// violation (23505, 1062): for transactions that pick a key and must pick
// another when a concurrent one took it. Off by default, since for most a
// duplicate key is a real error.
func TxRetryUniqueViolation() TxOption {
	return func(c *txConfig) { c.unique = true }
}

// RunTx runs fn in a transaction and commits it, running the whole
// transaction again when it failed in a way that left nothing committed and
// may succeed next time:
//
//   - BEGIN failed on a lost connection;
//   - fn or COMMIT failed with a serialization failure or deadlock (40001,
//     40P01; MySQL 1213, and 1205 after rolling back), or a code given with
//     TxRetryOn, or a unique violation with TxRetryUniqueViolation;
//   - the connection was lost before COMMIT was sent (the server rolls the
//     transaction back), which the error chain or the wrapper's socket
//     check before COMMIT proves.
//
// It never runs it again when COMMIT's outcome is unknown (the connection
// was lost while COMMIT was in flight): the error then matches
// ErrCommitUnknown and the connection is discarded; a read-only
// transaction (opts.ReadOnly) is the exception, since it cannot have
// written. Every failed attempt is rolled back. Waits between attempts are
// capped and fully jittered, within ctx. When RunTx gives up after more
// than one attempt, its error says how many were made and wraps the last
// cause; a first failure that is not retried comes back as it is.
//
// fn may run more than once: anything it does outside the database (an
// email, a message, a counter in memory) must be safe to repeat, or done
// after RunTx returns. fn must use the tx and ctx it is given.
func RunTx(ctx context.Context, db TxBeginner, opts *sql.TxOptions, fn func(ctx context.Context, tx *sql.Tx) error, options ...TxOption) error {
	cfg := txConfig{attempts: defaultTxAttempts, initial: defaultTxBackoff, max: defaultTxMax}
	for _, o := range options {
		o(&cfg)
	}
	k := txCounters(db)
	bo := backoff{initial: cfg.initial, max: max(cfg.max, cfg.initial)}
	readOnly := opts != nil && opts.ReadOnly
	var last error
	for attempt := 1; ; attempt++ {
		if k != nil {
			k.txAttempts.Add(1)
		}
		err := runOnce(ctx, db, opts, fn)
		if err == nil {
			return nil
		}
		last = err
		cause, retry := cfg.retryable(err, readOnly)
		switch {
		case !retry:
			return giveUp(attempt, last, nil)
		case attempt >= cfg.attempts:
			return giveUp(attempt, last, errors.New("attempts exhausted"))
		case ctx.Err() != nil:
			return giveUp(attempt, last, context.Cause(ctx))
		}
		if k != nil {
			k.txRetries[cause].Add(1)
		}
		if err := sleepCtx(ctx, bo.next()); err != nil {
			return giveUp(attempt, last, err)
		}
	}
}

// runOnce is one attempt: BEGIN, fn, COMMIT, and ROLLBACK on any failure.
func runOnce(ctx context.Context, db TxBeginner, opts *sql.TxOptions, fn func(context.Context, *sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, opts)
	if err != nil {
		return &beginError{err}
	}
	if err := fn(ctx, tx); err != nil {
		_ = tx.Rollback() // the guard returns nil when the server already ended it
		return err
	}
	err = tx.Commit()
	if err != nil && !errors.Is(err, ErrTxAborted) && !errors.Is(err, ErrCommitUnknown) &&
		(IsDisconnect(err) || errors.Is(err, driver.ErrBadConn)) && !pgconn.SafeToRetry(err) {
		// A driver without the wrapper's guard: a connection lost during
		// COMMIT leaves its outcome unknown all the same.
		return &txError{kind: ErrCommitUnknown, err: err}
	}
	return err
}

// beginError marks a failure of BEGIN: nothing of the transaction ran.
type beginError struct{ err error }

func (e *beginError) Error() string { return e.err.Error() }
func (e *beginError) Unwrap() error { return e.err }

// retryable decides, in the net/http style of ordered guards, whether the
// whole transaction may run again after err, and files it under a cause.
func (cfg *txConfig) retryable(err error, readOnly bool) (TxRetryCause, bool) {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return 0, false // the caller gave up
	}
	if errors.Is(err, ErrCommitUnknown) {
		if readOnly {
			return TxRetryConnLost, true // nothing to commit: it cannot have written
		}
		return 0, false // it may have committed: only the caller can check
	}
	if code, ok := errorCode(err); ok {
		switch code {
		case "40001", "1205":
			return TxRetrySerialization, true
		case "40P01", "1213":
			return TxRetryDeadlock, true
		case "23505", "1062":
			if cfg.unique {
				return TxRetryUnique, true
			}
		}
		for _, c := range cfg.extra {
			if c == code {
				return TxRetryExtra, true
			}
		}
	}
	var be *beginError
	if errors.As(err, &be) && (IsDisconnect(err) || Classify(err) == ClassCannotConnect || errors.Is(err, driver.ErrBadConn) || pgconn.SafeToRetry(err)) {
		return TxRetryConnLost, true // BEGIN never got a transaction started
	}
	if errors.Is(err, ErrTxAborted) && (IsDisconnect(err) || errors.Is(err, ErrServerClosed) || pgconn.SafeToRetry(err)) {
		return TxRetryConnLost, true // the connection went before COMMIT was sent: rolled back
	}
	if IsDisconnect(err) && !errors.Is(err, ErrTxAborted) {
		return TxRetryConnLost, true // lost inside fn, before COMMIT: rolled back
	}
	return 0, false // conservatively
}

// errorCode is the SQLSTATE or MySQL error number in err's chain; for an
// ErrTxAborted, that of what ended the transaction first (the 25P02 of a
// later statement says only that it had ended).
func errorCode(err error) (string, bool) {
	var te *txError
	if errors.As(err, &te) && te.cause != nil {
		if code, ok := errorCode(te.cause); ok {
			return code, true
		}
	}
	if code, ok := asPgError(err); ok {
		return code, true
	}
	if n, ok := asMySQLNumber(err); ok {
		return strconv.Itoa(int(n)), true
	}
	return "", false
}

// giveUp is RunTx's final error.
func giveUp(attempts int, last, why error) error {
	if attempts == 1 && why == nil {
		return unwrapBegin(last)
	}
	if why == nil {
		return fmt.Errorf("resilientpg: RunTx: failed after %d attempts: %w", attempts, unwrapBegin(last))
	}
	return fmt.Errorf("resilientpg: RunTx: gave up after %d attempts (%w): %w", attempts, why, unwrapBegin(last))
}

func unwrapBegin(err error) error {
	if be, ok := err.(*beginError); ok {
		return be.err
	}
	return err
}

// txCounters finds the counters of the wrapper behind db, if any.
func txCounters(db TxBeginner) *counters {
	switch d := db.(type) {
	case *sql.DB:
		if c := connectorOf(d); c != nil {
			return &c.stats
		}
	case *sql.Conn:
		var k *counters
		_ = d.Raw(func(dc any) error {
			if w, ok := dc.(*conn); ok {
				k = &w.c.stats
			}
			return nil
		})
		return k
	}
	return nil
}
