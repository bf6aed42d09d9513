package resilientpg

import (
	"database/sql/driver"
	"strconv"
	"strings"
	"time"
)

// RetryReason says why the wrapper did or did not let database/sql run a
// failed statement again on another connection.
type RetryReason uint8

const (
	// ReasonMayHaveRun: not retried, because the connection was lost while
	// the statement was in flight and the server may have executed it.
	ReasonMayHaveRun RetryReason = iota
	// ReasonInTx: not retried, because it ran inside a transaction, whose
	// earlier statements were lost with the connection.
	ReasonInTx
	// ReasonRetryOff: not retried, because resilient_retry=off.
	ReasonRetryOff
	// ReasonNotSent: retried; the driver proved nothing was sent.
	ReasonNotSent
	// ReasonReadOnly: retried; a read-only server (a demoted primary)
	// rejected it, so it did not execute.
	ReasonReadOnly
	// ReasonIdempotent: retried; the caller marked the context with
	// WithIdempotent.
	ReasonIdempotent
	// ReasonUnavailable: retried; a connection pooler in front of the
	// server (PgBouncer) answered that it had no server to run it on, so it
	// did not run. The connection waits at the connect gate for a probe
	// that gets through to a server.
	ReasonUnavailable
	numRetryReasons
)

var reasonNames = [numRetryReasons]string{"may have run", "in transaction", "retry off", "not sent", "read-only", "idempotent", "server unavailable"}

var reasonLabels = [numRetryReasons]string{"may_have_run", "in_tx", "retry_off", "not_sent", "read_only", "idempotent", "unavailable"}

func (r RetryReason) String() string {
	if r < numRetryReasons {
		return reasonNames[r]
	}
	return "RetryReason(" + strconv.Itoa(int(r)) + ")"
}

// Label is the reason as a metric label or log attribute value:
// may_have_run, in_tx, retry_off, not_sent, read_only, idempotent,
// unavailable.
func (r RetryReason) Label() string {
	if r < numRetryReasons {
		return reasonLabels[r]
	}
	return r.String()
}

// Retried reports whether the reason lets database/sql run the statement
// again.
func (r RetryReason) Retried() bool { return r >= ReasonNotSent }

// StatementError is the error of a statement whose connection failed. It
// says what happened to the connection, whether the statement was handed
// back to database/sql to run again on another connection, and why. The
// driver's own error stays in the chain: errors.Is and errors.As find
// io.ErrUnexpectedEOF, *pgconn.PgError, *mysql.MySQLError or a net.Error
// through it, and a retried one also matches driver.ErrBadConn, which is
// what makes database/sql retry.
//
// A caller sees a retried StatementError only when every attempt failed:
// *sql.DB makes up to three, *sql.Conn and *sql.Tx one.
type StatementError struct {
	Class  Class       // what the error says about the connection
	Reason RetryReason // whether and why it was retried
	Err    error       // the driver's error
}

func (e *StatementError) Error() string {
	var b strings.Builder
	b.WriteString("resilientpg: ")
	switch e.Reason {
	case ReasonMayHaveRun:
		b.WriteString("connection lost while the statement was in flight (")
		b.WriteString(e.Class.String())
		b.WriteString("); not retried, because the server may have executed it; " +
			"if running it twice is safe, pass a context made by resilientpg.WithIdempotent")
	case ReasonInTx:
		b.WriteString("connection lost inside a transaction (")
		b.WriteString(e.Class.String())
		b.WriteString("); not retried, because the transaction's earlier statements were lost with it; " +
			"roll back and run the whole transaction again")
	case ReasonRetryOff:
		b.WriteString("connection lost (")
		b.WriteString(e.Class.String())
		b.WriteString("); not retried, because resilient_retry=off")
	default:
		b.WriteString("statement did not run (")
		if e.Reason == ReasonNotSent {
			b.WriteString(e.Class.String())
			b.WriteString(" before it was sent")
		} else {
			b.WriteString(e.Reason.String())
		}
		b.WriteString("); database/sql retries it on another connection, up to 3 attempts in all " +
			"through *sql.DB (none through *sql.Conn or *sql.Tx), and the last attempt failed")
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the driver's error, and driver.ErrBadConn for a retried
// statement.
func (e *StatementError) Unwrap() []error {
	if e.Reason.Retried() {
		return []error{driver.ErrBadConn, e.Err}
	}
	return []error{e.Err}
}

// ServerDownError is returned by Connect when the server is known to be
// unreachable and resilient_connect_wait does not allow waiting for it, or
// when the caller's context ended while it waited. It unwraps to the last
// dial error and, in the second case, to the context's error.
type ServerDownError struct {
	Since    time.Time // when the connector saw the server go
	Attempts int       // connect attempts this call made itself; the others waited for another caller's probe
	Cause    error     // the caller's context error, if that ended the wait
	Err      error     // the last dial error
}

func (e *ServerDownError) Error() string {
	var b strings.Builder
	b.WriteString("resilientpg: connect: gave up after ")
	b.WriteString(strconv.Itoa(e.Attempts))
	if e.Attempts == 1 {
		b.WriteString(" attempt")
	} else {
		b.WriteString(" attempts")
	}
	if e.Cause != nil {
		b.WriteString(" (")
		b.WriteString(e.Cause.Error())
		b.WriteString(")")
	}
	b.WriteString("; server unreachable since ")
	b.WriteString(e.Since.Format(time.RFC3339Nano))
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the context's error, if any, and the last dial error.
func (e *ServerDownError) Unwrap() []error {
	if e.Cause != nil {
		return []error{e.Cause, e.Err}
	}
	return []error{e.Err}
}
