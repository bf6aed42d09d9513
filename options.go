package resilientpg

import (
	"context"
	"log/slog"
	"net"
	"strconv"
	"time"
)

// PingPolicy decides when a checkout makes a round trip to the server.
type PingPolicy uint8

const (
	// PingIdle pings at checkout only when the connection has been idle for
	// at least Options.PingIdle. It is the default: a connection that was in
	// use a moment ago is very likely alive, and the socket check still
	// catches one the server has closed.
	PingIdle PingPolicy = iota
	// PingAlways pings at every checkout of a used connection. It is the
	// only policy that catches a half-open connection used a moment ago.
	PingAlways
	// PingNever never pings; the socket check, the max age and the max idle
	// time still apply.
	PingNever
)

// String returns the DSN spelling of the policy.
func (p PingPolicy) String() string {
	switch p {
	case PingIdle:
		return "idle"
	case PingAlways:
		return "always"
	case PingNever:
		return "never"
	}
	return "PingPolicy(" + strconv.Itoa(int(p)) + ")"
}

// Jitter spreads the max age of each connection: a connection lives between
// MaxAge minus the jitter and MaxAge, drawn uniformly when it connects, so
// connections opened together do not expire together. Set one of the two
// fields.
type Jitter struct {
	// Percent of MaxAge, 0 <= Percent < 100.
	Percent float64
	// Duration is a fixed spread, 0 <= Duration < MaxAge.
	Duration time.Duration
}

// JitterPercent returns a jitter of p percent of the max age.
func JitterPercent(p float64) Jitter { return Jitter{Percent: p} }

// JitterDuration returns a jitter of a fixed duration.
func JitterDuration(d time.Duration) Jitter { return Jitter{Duration: d} }

// of returns the spread for a given max age.
func (j Jitter) of(maxAge time.Duration) time.Duration {
	if j.Duration > 0 {
		return j.Duration
	}
	return time.Duration(float64(maxAge) * j.Percent / 100)
}

// String returns the DSN spelling of the jitter.
func (j Jitter) String() string {
	if j.Duration > 0 {
		return j.Duration.String()
	}
	return strconv.FormatFloat(j.Percent, 'f', -1, 64) + "%"
}

// Unset marks a pool-size option that is left to *sql.DB's own setting.
const Unset = -1

// Options configure the wrapper. Every field has a DSN key of the same
// meaning (see the README's key table). Start from DefaultOptions: the zero
// value is rejected, because a zero ping timeout or a zero idle threshold
// would silently mean something else than the defaults.
type Options struct {
	// Ping is the checkout probe policy (resilient_ping).
	Ping PingPolicy
	// PingIdle is the idle time after which PingIdle pings (resilient_ping_idle).
	PingIdle time.Duration
	// PingTimeout bounds one checkout ping, together with the caller's
	// deadline, whichever ends first (resilient_ping_timeout).
	PingTimeout time.Duration
	// MaxAge is the maximum connection age, 0 = off (resilient_max_age).
	MaxAge time.Duration
	// MaxAgeJitter spreads MaxAge per connection (resilient_max_age_jitter).
	MaxAgeJitter Jitter
	// MaxIdleTime discards, at checkout and without a ping, a connection
	// idle longer than this, 0 = off (resilient_max_idle_time).
	MaxIdleTime time.Duration
	// MaxOpenConns and MaxIdleConns size the *sql.DB
	// (resilient_max_open_conns, resilient_max_idle_conns). They can only be
	// applied by Open and OpenDB, which own the *sql.DB; Unset leaves the
	// *sql.DB default.
	MaxOpenConns int
	MaxIdleConns int

	// ConnectTimeout bounds a Connect whose context has no deadline
	// (database/sql's opener uses one that never ends) (resilient_connect_timeout).
	ConnectTimeout time.Duration
	// ConnectBackoff and ConnectBackoffMax shape the waits between probe
	// connects while the server is down (resilient_connect_backoff,
	// resilient_connect_backoff_max).
	ConnectBackoff    time.Duration
	ConnectBackoffMax time.Duration
	// ProbeInterval is how often a server that refuses connections
	// (nothing listening, or a proxy with nothing behind it) is probed
	// while down: each wait is drawn from half to one and a half times
	// this, so a pool makes at most about 1/ProbeInterval connects a
	// second and finds the server back within about one interval
	// (resilient_probe_interval). A refusal costs the server nothing; a
	// rejection that costs it work (starting up, too many connections)
	// is backed off by ConnectBackoff instead.
	ProbeInterval time.Duration
	// Keepalive is the TCP keepalive of every connection the wrapper dials
	// (resilient_keepalive: idle, interval and count such as "15s,5s,3",
	// or "off"); Enable false turns keepalive off. The default finds a
	// dead idle path in about 30 s (see tcp.go and the README).
	Keepalive net.KeepAliveConfig
	// TCPUserTimeout is how long sent data may stay unacknowledged before
	// the kernel ends the connection, 0 = off (resilient_tcp_user_timeout;
	// Linux only). It ends a statement stuck on a dead path without a
	// context deadline, and bounds each connect.
	TCPUserTimeout time.Duration
	// ConnectWait is how long a Connect waits for a server known to be
	// down, within its context; 0 fails at once (resilient_connect_wait).
	ConnectWait time.Duration
	// Retry is the statement retry policy (resilient_retry).
	Retry RetryPolicy
	// RejectReadOnly discards, and invalidates the pool on, a read-only
	// error: a demoted primary (resilient_reject_read_only).
	RejectReadOnly ReadOnlyPolicy

	// Log is the lowest level of events logged, LogOff for none
	// (resilient_log). Every record has an "event" attribute naming it.
	Log LogLevel
	// Logger receives the events; nil means slog.Default(). Setting it
	// with Log at LogOff is an error, since it would be silently unused.
	Logger *slog.Logger
	// Reap ends the server session of a connection discarded because its
	// path died (a checkout ping that timed out, a keepalive or TCP user
	// timeout), over a connection of its own, once it has checked the
	// session is that connection's; see ReapStats (resilient_reap, on by
	// default). PostgreSQL through pgx and MySQL through
	// go-sql-driver/mysql dialed by the wrapper.
	Reap bool
	// LeakThreshold reports a connection held longer than this as
	// leak.suspected, with the borrower's stack; 0 = off
	// (resilient_leak_threshold).
	LeakThreshold time.Duration

	// Credentials, if set, is called for the user and password of new
	// connections, so that rotated passwords and short-lived tokens (RDS
	// IAM) reach the pool without reopening it; open connections keep the
	// credentials they logged in with. Connects that need credentials at
	// the same time share one call; a result with Expires is reused until
	// shortly before it. Each call gets a context bounded by
	// ConnectTimeout, and a caller that gives up does not cancel it for the
	// others. Its error fails the connect at once as a *CredentialError;
	// it is never taken for the server being down. A connect the server
	// refuses (28P01, 28000, 1045, 1698) with a reused result calls it
	// again at once and tries once more. Only for the resilientpg and
	// resilientmysql drivers; it excludes the file options.
	Credentials func(ctx context.Context) (Credentials, error)
	// PasswordFile is an absolute path whose content, without its trailing
	// newline, is the password of new connections (resilient_password_file);
	// it is read again when the file changes, so a Vault agent or a
	// Kubernetes secret volume can rotate it. UserFile likewise holds the
	// user (resilient_user_file) and needs PasswordFile.
	PasswordFile string
	UserFile     string
}

// ReadOnlyPolicy says whether a read-only error means a failover.
type ReadOnlyPolicy uint8

const (
	// ReadOnlyAuto rejects when the DSN asks for a writable server
	// (PostgreSQL target_session_attrs=read-write or primary).
	ReadOnlyAuto ReadOnlyPolicy = iota
	// ReadOnlyReject always treats a read-only error as a demoted primary.
	ReadOnlyReject
	// ReadOnlyAllow passes read-only errors through like any SQL error.
	ReadOnlyAllow
)

func (p ReadOnlyPolicy) String() string {
	switch p {
	case ReadOnlyReject:
		return "true"
	case ReadOnlyAllow:
		return "false"
	}
	return "auto"
}

// Defaults, chosen in the README's "Choosing the defaults".
const (
	defaultPingIdle    = time.Second
	defaultPingTimeout = 2 * time.Second
	defaultMaxAge      = 30 * time.Minute
	defaultJitterPct   = 10

	defaultConnectTimeout    = 30 * time.Second
	defaultConnectBackoff    = 100 * time.Millisecond
	defaultConnectBackoffMax = time.Second
	defaultProbeInterval     = 30 * time.Millisecond
	defaultConnectWait       = 30 * time.Second
)

// DefaultOptions returns the options a DSN without resilient_ keys gets.
func DefaultOptions() Options {
	return Options{
		Ping:         PingIdle,
		PingIdle:     defaultPingIdle,
		PingTimeout:  defaultPingTimeout,
		MaxAge:       defaultMaxAge,
		MaxAgeJitter: JitterPercent(defaultJitterPct),
		MaxOpenConns: Unset,
		MaxIdleConns: Unset,

		ConnectTimeout:    defaultConnectTimeout,
		ConnectBackoff:    defaultConnectBackoff,
		ConnectBackoffMax: defaultConnectBackoffMax,
		ProbeInterval:     defaultProbeInterval,
		Keepalive:         defaultKeepalive,
		TCPUserTimeout:    defaultUserTimeout,
		ConnectWait:       defaultConnectWait,
		Reap:              true,
	}
}
