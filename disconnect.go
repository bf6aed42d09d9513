package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
)

// Class is what an error says about the connection and the server, as far
// as pooling and retrying are concerned.
type Class uint8

const (
	// ClassNone is the class of a nil error.
	ClassNone Class = iota
	// ClassOther is any error that says nothing about the connection: a
	// syntax error, a constraint violation, a driver usage error.
	ClassOther
	// ClassCanceled: the caller's context was canceled or its deadline
	// passed. Never a disconnect: the caller gave up, the server did not.
	ClassCanceled
	// ClassConnLost: the connection broke (EOF, reset, broken pipe,
	// PostgreSQL class 08, mysql's "invalid connection").
	ClassConnLost
	// ClassShutdown: the server is ending sessions because it shuts down,
	// crashed, or an administrator ended this one (57P01, 57P02, MySQL
	// 1053, MariaDB 1927).
	ClassShutdown
	// ClassCannotConnect: no new connection now (refused, 57P03 starting
	// up, 53300 / 1040 too many connections, unreachable).
	ClassCannotConnect
	// ClassSessionTimeout: the server ended an idle session (57P05, 25P03,
	// MySQL 4031).
	ClassSessionTimeout
	// ClassReadOnly: a write reached a read-only server (25006, 1290, 1792,
	// 1836), typically a demoted primary after a failover.
	ClassReadOnly
	// ClassSerialization: the transaction lost a conflict and may be run
	// again as a whole by the caller (40001, 40P01, 1213, 1205).
	ClassSerialization
	// ClassAuth: bad credentials or a missing database (28P01, 28000,
	// 3D000, 1045, 1044, 1049, 1698). Never retried: it will not heal.
	ClassAuth
	numClasses
)

var classNames = [numClasses]string{"none", "other", "canceled", "connection lost", "server shutdown",
	"cannot connect", "session timeout", "read-only", "serialization", "auth"}

var classLabels = [numClasses]string{"none", "other", "canceled", "conn_lost", "shutdown",
	"cannot_connect", "session_timeout", "read_only", "serialization", "auth"}

func (c Class) String() string {
	if c < numClasses {
		return classNames[c]
	}
	return "Class(" + strconv.Itoa(int(c)) + ")"
}

// Label is the class as a metric label or log attribute value: conn_lost,
// shutdown, cannot_connect, session_timeout, read_only, serialization, auth,
// canceled, other, none.
func (c Class) Label() string {
	if c < numClasses {
		return classLabels[c]
	}
	return c.String()
}

// IsDisconnect reports whether err means the connection it came from can no
// longer be used: connection lost, server shutdown, session timed out.
// Context cancellation and deadlines are not disconnects.
func IsDisconnect(err error) bool {
	switch Classify(err) {
	case ClassConnLost, ClassShutdown, ClassSessionTimeout:
		return true
	}
	return false
}

// Classify sorts err into a Class. It unwraps (errors.As / errors.Is) and
// knows pgconn's and go-sql-driver/mysql's error types, any error with a
// SQLState() method (lib/pq, crdb-style), and the net, syscall and io errors
// beneath them. The order of the checks is the order of precedence.
func Classify(err error) Class {
	if err == nil {
		return ClassNone
	}
	if _, ok := asType[*CredentialError](err); ok {
		return ClassAuth // whatever the credentials function's own error wraps
	}
	if _, ok := asType[*connectTimeoutError](err); ok {
		return ClassCannotConnect // a connect's own bound, not the caller's deadline
	}
	// The caller's own deadline first: pgconn and mysql report it wrapped in
	// their own errors, and it says nothing about the server.
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ClassCanceled
	}
	if _, ok := asType[*targetMismatchError](err); ok {
		// Only a server of the wrong role answered (a standby where
		// target_session_attrs wants a primary): a failover may be under
		// way, and no suitable connection can be had now.
		return ClassCannotConnect
	}
	// A server's answer is the most precise evidence there is.
	if pe, ok := asType[*pgconn.PgError](err); ok {
		if class, _, ok := poolerReason(pe); ok {
			return class // PgBouncer's own reasons, all 08P01
		}
		return classifySQLState(pe.Code)
	}
	if me, ok := asType[*mysql.MySQLError](err); ok {
		return classifyMySQL(me)
	}
	if se, ok := asType[sqlStater](err); ok {
		return classifySQLState(se.SQLState())
	}
	switch {
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		if oe, ok := asType[*net.OpError](err); ok && (oe.Op == "read" || oe.Op == "write") {
			return ClassConnLost // an established connection's path died under it
		}
		return ClassCannotConnect // nothing routes: a new connection fails now
	case errors.Is(err, syscall.ECONNREFUSED):
		// Nothing listens: a new connection fails now.
		return ClassCannotConnect
	case errors.Is(err, mysql.ErrInvalidConn), errors.Is(err, driver.ErrBadConn), errors.Is(err, pgconn.ErrConnClosed),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.ETIMEDOUT):
		// The socket is gone or the peer stopped answering.
		return ClassConnLost
	}
	if oe, ok := asType[*net.OpError](err); ok && oe.Op == "dial" {
		return ClassCannotConnect // DNS or other dial failure
	}
	if ne, ok := asType[net.Error](err); ok && ne.Timeout() {
		// A driver-level I/O timeout (mysql's readTimeout, a TCP
		// keepalive): the caller's context was ruled out above.
		return ClassConnLost
	}
	return ClassOther
}

// sqlStater is crdb's and lib/pq's way to expose a SQLSTATE.
type sqlStater interface {
	error
	SQLState() string
}

// classifySQLState maps a PostgreSQL SQLSTATE.
func classifySQLState(code string) Class {
	switch code {
	case "57P01", "57P02": // admin_shutdown (also pg_terminate_backend), crash_shutdown
		return ClassShutdown
	case "57P03", "53300", "08001", "08004": // cannot_connect_now, too_many_connections, unable to establish, rejected
		return ClassCannotConnect
	case "57P05", "25P03": // idle_session_timeout, idle_in_transaction_session_timeout
		return ClassSessionTimeout
	case "25006": // read_only_sql_transaction
		return ClassReadOnly
	case "40001", "40P01": // serialization_failure, deadlock_detected
		return ClassSerialization
	case "28P01", "28000", "3D000": // invalid_password, invalid_authorization, invalid_catalog_name
		return ClassAuth
	}
	if strings.HasPrefix(code, "08") { // connection_exception and the rest of its class
		return ClassConnLost
	}
	return ClassOther
}

// classifyMySQL maps a MySQL or MariaDB error number.
func classifyMySQL(me *mysql.MySQLError) Class {
	switch me.Number {
	case 1053, 1927: // ER_SERVER_SHUTDOWN, MariaDB ER_CONNECTION_KILLED
		return ClassShutdown
	case 1040, 1203: // ER_CON_COUNT_ERROR, ER_TOO_MANY_USER_CONNECTIONS
		return ClassCannotConnect
	case 4031:
		// MySQL 8.0.24+ ER_CLIENT_INTERACTION_TIMEOUT; MariaDB uses 4031 for
		// something else. The driver does not expose the server flavour, so
		// the message is the only way to tell them apart.
		if strings.Contains(me.Message, "inactivity") {
			return ClassSessionTimeout
		}
	case 1290, 1792, 1836: // ER_OPTION_PREVENTS_STATEMENT (read_only), ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION, ER_READ_ONLY_MODE
		return ClassReadOnly
	case 1213, 1205: // ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT
		return ClassSerialization
	case 1045, 1044, 1049, 1698: // access denied (user, db), unknown database, access denied (no password)
		return ClassAuth
	}
	return ClassOther
}

// serverWide reports whether err proves an event that affects every
// connection to the server, not just the one it came from, and which. 57P01
// and 1927 do not: pg_terminate_backend and KILL end one session with the
// same code a shutdown uses, so a restart is instead recognised by the
// refused-then-accepted sequence the connector sees.
func serverWide(err error) (InvalidationCause, bool) {
	if pe, ok := asType[*pgconn.PgError](err); ok {
		return InvalidCrash, pe.Code == "57P02" // crash_shutdown: every backend is gone
	}
	if me, ok := asType[*mysql.MySQLError](err); ok {
		return InvalidShutdown, me.Number == 1053 // the server is shutting down
	}
	return 0, false
}

// privilegeRevoked reports whether a statement failed because the
// session's role lost its rights or was dropped under it: what Vault's
// default revocation (REVOKE, then DROP ROLE, sessions left open) does to
// the sessions of an expired lease. PostgreSQL: 42501
// insufficient_privilege, 42704 "invalid role OID" (current_user of a
// dropped role); MySQL/MariaDB: 1142 table, 1143 column access denied.
func privilegeRevoked(err error) bool {
	if pe, ok := asType[*pgconn.PgError](err); ok {
		return pe.Code == "42501" || pe.Code == "42704" && strings.HasPrefix(pe.Message, "invalid role OID")
	}
	if me, ok := asType[*mysql.MySQLError](err); ok {
		return me.Number == 1142 || me.Number == 1143
	}
	return false
}

// asPgError returns the SQLSTATE of a PostgreSQL error in err's chain.
func asPgError(err error) (string, bool) {
	if pe, ok := asType[*pgconn.PgError](err); ok {
		return pe.Code, true
	}
	return "", false
}

// asMySQLNumber returns the number of a MySQL error in err's chain.
func asMySQLNumber(err error) (uint16, bool) {
	if me, ok := asType[*mysql.MySQLError](err); ok {
		return me.Number, true
	}
	return 0, false
}

// asType is Go 1.26's errors.AsType, kept local so the module builds with
// Go 1.25, the floor pgx v5.12 sets: a pgx user should never have to move
// to a newer Go for this package. It runs only on error paths.
func asType[T any](err error) (T, bool) {
	var target T
	ok := errors.As(err, &target)
	return target, ok
}
