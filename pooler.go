package resilientpg

import (
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// PgBouncer makes every error of its own with SQLSTATE 08P01 and the
// reason as the message, no detail. Class 08 alone says "connection lost",
// which is right for some reasons and wrong for the others: a login it
// refuses is an auth error that will not heal, and "server login has been
// failing" means that the query never reached a server, so it is safe to
// run again once a server is back, and a caller should wait for that
// rather than fail. The reasons are PgBouncer 1.18's (src/*.c,
// disconnect_client and disconnect_server).
var pgbouncerReasons = [...]struct {
	prefix     string
	class      Class
	retryLater bool // no server now: the statement did not run; wait and run it again
}{
	// No server to run it on: nothing ran.
	{"server login has been failing", ClassCannotConnect, true}, // server_login_retry after a failed login
	{"query_wait_timeout", ClassCannotConnect, true},            // queued longer than query_wait_timeout
	{"pgbouncer cannot connect to server", ClassCannotConnect, true},
	{"client_login_timeout (server down)", ClassCannotConnect, true},
	{"no more connections allowed", ClassCannotConnect, false}, // max_client_conn: too many clients, as 53300
	// The server connection went while the query may have been on it.
	{"server conn crashed?", ClassConnLost, false},
	{"query timeout", ClassConnLost, false},
	{"database removed", ClassConnLost, false}, // KILL on the admin console
	{"database configuration changed", ClassConnLost, false},
	// The pooler ended an idle session.
	{"client_idle_timeout", ClassSessionTimeout, false},
	{"idle transaction timeout", ClassSessionTimeout, false},
	// The caller's login or request is wrong: retrying will not help.
	{"no such database", ClassAuth, false},
	{"no such user", ClassAuth, false},
	{"password authentication failed", ClassAuth, false},
	{"SASL authentication failed", ClassAuth, false},
	{"SCRAM authentication failed", ClassAuth, false},
	{"certificate authentication failed", ClassAuth, false},
	{`"trust" authentication failed`, ClassAuth, false},
	{"login failed", ClassAuth, false},
	{"not allowed", ClassAuth, false},
	{"unsupported startup parameter", ClassOther, false},
	{"invalid command", ClassOther, false}, // the admin console
	{"unsupported packet type", ClassOther, false},
}

// poolerReason finds PgBouncer's reason for a 08P01 error.
func poolerReason(pe *pgconn.PgError) (class Class, retryLater, ok bool) {
	if pe.Code != "08P01" || pe.Detail != "" {
		return 0, false, false
	}
	for _, r := range pgbouncerReasons {
		if strings.HasPrefix(pe.Message, r.prefix) {
			return r.class, r.retryLater, true
		}
	}
	return 0, false, false
}

// poolerRetryLater reports whether err is a pooler's answer that it has no
// server now: the statement or connect did not reach a server, and a
// connect that succeeds says nothing until a statement gets through.
func poolerRetryLater(err error) bool {
	pe, ok := asType[*pgconn.PgError](err)
	if !ok {
		return false
	}
	_, later, _ := poolerReason(pe)
	return later
}
