package resilientpg

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"
	"strings"
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

// validate checks every field and names the DSN key in its error.
func (o *Options) validate() error {
	switch o.Ping {
	case PingIdle, PingAlways, PingNever:
	default:
		return &ConfigError{Key: keyPing, Value: o.Ping.String(), Allowed: "always, idle or never"}
	}
	if o.PingIdle < 0 {
		return &ConfigError{Key: keyPingIdle, Value: o.PingIdle.String(), Allowed: "a duration >= 0"}
	}
	if o.PingTimeout <= 0 {
		return &ConfigError{Key: keyPingTimeout, Value: o.PingTimeout.String(), Allowed: "a duration > 0"}
	}
	if o.MaxAge < 0 {
		return &ConfigError{Key: keyMaxAge, Value: o.MaxAge.String(), Allowed: "a duration >= 0 (0 = off)"}
	}
	j := o.MaxAgeJitter
	switch {
	case j.Percent != 0 && j.Duration != 0:
		return &ConfigError{Key: keyMaxAgeJitter, Value: fmt.Sprintf("%v%% and %v", j.Percent, j.Duration),
			Allowed: "either a percentage or a duration, not both"}
	case j.Percent < 0 || j.Percent >= 100 || j.Percent != j.Percent: // the last catches NaN
		return &ConfigError{Key: keyMaxAgeJitter, Value: j.String(), Allowed: "a percentage from 0% to below 100%"}
	case j.Duration < 0 || (j.Duration > 0 && o.MaxAge > 0 && j.Duration >= o.MaxAge):
		return &ConfigError{Key: keyMaxAgeJitter, Value: j.String(),
			Allowed: "a duration >= 0 and below resilient_max_age (" + o.MaxAge.String() + ")"}
	}
	if o.MaxIdleTime < 0 {
		return &ConfigError{Key: keyMaxIdleTime, Value: o.MaxIdleTime.String(), Allowed: "a duration >= 0 (0 = off)"}
	}
	if o.ConnectTimeout <= 0 {
		return &ConfigError{Key: keyConnectTimeout, Value: o.ConnectTimeout.String(), Allowed: "a duration > 0"}
	}
	if o.ConnectBackoff <= 0 {
		return &ConfigError{Key: keyConnectBackoff, Value: o.ConnectBackoff.String(), Allowed: "a duration > 0"}
	}
	if o.ConnectBackoffMax < o.ConnectBackoff {
		return &ConfigError{Key: keyConnectBackoffMax, Value: o.ConnectBackoffMax.String(),
			Allowed: "a duration >= resilient_connect_backoff (" + o.ConnectBackoff.String() + ")"}
	}
	if o.ProbeInterval <= 0 || o.ProbeInterval > o.ConnectBackoffMax {
		return &ConfigError{Key: keyProbeInterval, Value: o.ProbeInterval.String(),
			Allowed: "a duration > 0 and at most resilient_connect_backoff_max (" + o.ConnectBackoffMax.String() + ")"}
	}
	if err := o.validateTCP(); err != nil {
		return err
	}
	if o.ConnectWait < 0 {
		return &ConfigError{Key: keyConnectWait, Value: o.ConnectWait.String(), Allowed: "a duration >= 0 (0 = fail at once)"}
	}
	if o.Retry > RetryOff {
		return &ConfigError{Key: keyRetry, Value: o.Retry.String(), Allowed: "safe or off"}
	}
	if o.RejectReadOnly > ReadOnlyAllow {
		return &ConfigError{Key: keyRejectReadOnly, Value: o.RejectReadOnly.String(), Allowed: "auto, true or false"}
	}
	if o.Log > LogDebug {
		return &ConfigError{Key: keyLog, Value: o.Log.String(), Allowed: "off, error, warn, info or debug"}
	}
	if o.Log == LogOff && o.Logger != nil {
		return &ConfigError{Key: keyLog, Value: o.Log.String(),
			Allowed: "a level (error, warn, info or debug) when Options.Logger is set, or no Logger"}
	}
	if o.LeakThreshold < 0 {
		return &ConfigError{Key: keyLeakThreshold, Value: o.LeakThreshold.String(), Allowed: "a duration >= 0 (0 = off)"}
	}
	if err := o.validateCredentials(); err != nil {
		return err
	}
	if o.MaxOpenConns < Unset {
		return &ConfigError{Key: keyMaxOpenConns, Value: strconv.Itoa(o.MaxOpenConns), Allowed: "an integer >= 0 (0 = unlimited)"}
	}
	if o.MaxIdleConns < Unset {
		return &ConfigError{Key: keyMaxIdleConns, Value: strconv.Itoa(o.MaxIdleConns), Allowed: "an integer >= 0"}
	}
	return nil
}

// validateTCP checks the TCP settings: positive keepalive timings, and a
// user timeout only where the kernel has one, in whole milliseconds.
func (o *Options) validateTCP() error {
	k := o.Keepalive
	if k.Enable && (k.Idle <= 0 || k.Interval <= 0 || k.Count <= 0) ||
		!k.Enable && k != (net.KeepAliveConfig{}) {
		return &ConfigError{Key: keyKeepalive, Value: keepaliveString(k),
			Allowed: findKey(keyKeepalive).allowed}
	}
	if o.TCPUserTimeout < 0 || o.TCPUserTimeout > 0 && o.TCPUserTimeout < time.Millisecond {
		return &ConfigError{Key: keyTCPUserTimeout, Value: o.TCPUserTimeout.String(), Allowed: findKey(keyTCPUserTimeout).allowed}
	}
	if o.TCPUserTimeout > 0 && !userTimeoutSupported {
		return &ConfigError{Key: keyTCPUserTimeout, Value: o.TCPUserTimeout.String(), Allowed: "0 on this platform: TCP_USER_TIMEOUT is Linux's"}
	}
	return nil
}

// tcpUnapplicable is the error for changed TCP settings where the wrapper
// does not dial: it names the first setting changed.
func (o *Options) tcpUnapplicable(allowed string) error {
	key, v := keyKeepalive, keepaliveString(o.Keepalive)
	if o.Keepalive == defaultKeepalive {
		key, v = keyTCPUserTimeout, o.TCPUserTimeout.String()
	}
	return &ConfigError{Key: key, Value: v, Allowed: allowed}
}

// tcpChanged reports whether the TCP settings differ from the defaults,
// which only the wrapper's own dialer can apply.
func (o *Options) tcpChanged() bool {
	return o.Keepalive != defaultKeepalive || o.TCPUserTimeout != defaultUserTimeout
}

// validateCredentials checks the credential options: one source, and
// absolute paths, since a relative one would depend on the working
// directory of whatever process opens the pool.
func (o *Options) validateCredentials() error {
	for _, f := range []struct{ key, path string }{{keyPasswordFile, o.PasswordFile}, {keyUserFile, o.UserFile}} {
		if f.path != "" && !filepath.IsAbs(f.path) {
			return &ConfigError{Key: f.key, Value: f.path, Allowed: findKey(f.key).allowed}
		}
	}
	if o.UserFile != "" && o.PasswordFile == "" {
		return &ConfigError{Key: keyUserFile, Value: o.UserFile, Allowed: "an absolute path, together with resilient_password_file"}
	}
	if o.Credentials != nil && o.PasswordFile != "" {
		return &ConfigError{Key: keyPasswordFile, Value: o.PasswordFile,
			Allowed: "no file when Options.Credentials is set: one source of credentials"}
	}
	return nil
}

// hasCredentials reports whether o sets a source of credentials.
func (o *Options) hasCredentials() bool {
	return o.Credentials != nil || o.PasswordFile != "" || o.UserFile != ""
}

// hasPoolSizing reports whether a pool-size key is set; only the functions
// that own the *sql.DB can honour it.
func (o *Options) hasPoolSizing() bool {
	return o.MaxOpenConns != Unset || o.MaxIdleConns != Unset
}

// ErrUnknownKey is the Err of a ConfigError for a resilient_ key that is not
// in the table, usually a typo.
var ErrUnknownKey = errors.New("unknown key")

// ConfigError reports an invalid resilient_ key or Options field. It names
// the key and the offending value, never the rest of the DSN, so a password
// cannot leak through it.
type ConfigError struct {
	Key     string // the DSN key, e.g. "resilient_ping"
	Value   string // the rejected value as given
	Allowed string // what would have been accepted
	Err     error  // the underlying parse error, if any
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	b.WriteString("resilientpg: ")
	if e.Err == ErrUnknownKey {
		b.WriteString("unknown key ")
	} else {
		b.WriteString("invalid ")
	}
	b.WriteString(e.Key)
	b.WriteString("=")
	b.WriteString(strconv.Quote(e.Value))
	if e.Allowed != "" {
		b.WriteString(": want ")
		b.WriteString(e.Allowed)
	}
	if e.Err != nil && e.Err != ErrUnknownKey {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the underlying parse error.
func (e *ConfigError) Unwrap() error { return e.Err }
