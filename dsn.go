package resilientpg

import (
	"errors"
	"slices"
	"strconv"
	"strings"
	"time"
)

// keyPrefix marks every DSN key the wrapper claims. Any key with it that is
// not in the table is an error, which catches typos that a pass-through key
// would turn into a server-side failure (pgx sends unknown keys as startup
// parameters, mysql as SET statements).
const keyPrefix = "resilient_"

const (
	keyPing         = "resilient_ping"
	keyPingIdle     = "resilient_ping_idle"
	keyPingTimeout  = "resilient_ping_timeout"
	keyMaxAge       = "resilient_max_age"
	keyMaxAgeJitter = "resilient_max_age_jitter"
	keyMaxIdleTime  = "resilient_max_idle_time"
	keyMaxOpenConns = "resilient_max_open_conns"
	keyMaxIdleConns = "resilient_max_idle_conns"

	keyConnectTimeout    = "resilient_connect_timeout"
	keyConnectBackoff    = "resilient_connect_backoff"
	keyConnectBackoffMax = "resilient_connect_backoff_max"
	keyConnectWait       = "resilient_connect_wait"
	keyProbeInterval     = "resilient_probe_interval"
	keyKeepalive         = "resilient_keepalive"
	keyTCPUserTimeout    = "resilient_tcp_user_timeout"
	keyRetry             = "resilient_retry"
	keyRejectReadOnly    = "resilient_reject_read_only"
	keyLog               = "resilient_log"
	keyLeakThreshold     = "resilient_leak_threshold"
	keyReap              = "resilient_reap"

	keyPasswordFile = "resilient_password_file"
	keyUserFile     = "resilient_user_file"
)

// dsnKey is one claimable key and how it sets its Options field.
type dsnKey struct {
	name    string
	allowed string
	set     func(o *Options, v string) error
}

var dsnKeys = []dsnKey{
	{keyPing, "always, idle or never", enumKey(func(o *Options) *PingPolicy { return &o.Ping },
		map[string]PingPolicy{"always": PingAlways, "idle": PingIdle, "never": PingNever})},
	{keyPingIdle, "a duration >= 0 such as 1s or 500ms", durationKey(func(o *Options) *time.Duration { return &o.PingIdle })},
	{keyPingTimeout, "a duration > 0 such as 2s or 500ms", durationKey(func(o *Options) *time.Duration { return &o.PingTimeout })},
	{keyMaxAge, "a duration >= 0 such as 30m (0 = off)", durationKey(func(o *Options) *time.Duration { return &o.MaxAge })},
	{keyMaxAgeJitter, "a percentage such as 10% or a duration such as 2m", func(o *Options, v string) error {
		if p, ok := strings.CutSuffix(v, "%"); ok {
			f, err := strconv.ParseFloat(p, 64)
			if err != nil {
				return err
			}
			o.MaxAgeJitter = JitterPercent(f)
			return nil
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			return err
		}
		o.MaxAgeJitter = JitterDuration(d)
		return nil
	}},
	{keyMaxIdleTime, "a duration >= 0 such as 5m (0 = off)", durationKey(func(o *Options) *time.Duration { return &o.MaxIdleTime })},
	{keyMaxOpenConns, "an integer >= 0 (0 = unlimited)", intKey(func(o *Options) *int { return &o.MaxOpenConns })},
	{keyMaxIdleConns, "an integer >= 0", intKey(func(o *Options) *int { return &o.MaxIdleConns })},
	{keyConnectTimeout, "a duration > 0 such as 30s", durationKey(func(o *Options) *time.Duration { return &o.ConnectTimeout })},
	{keyConnectBackoff, "a duration > 0 such as 100ms", durationKey(func(o *Options) *time.Duration { return &o.ConnectBackoff })},
	{keyConnectBackoffMax, "a duration > 0 such as 1s", durationKey(func(o *Options) *time.Duration { return &o.ConnectBackoffMax })},
	{keyProbeInterval, "a duration > 0 such as 30ms", durationKey(func(o *Options) *time.Duration { return &o.ProbeInterval })},
	{keyKeepalive, "off, or idle, interval and count of TCP keepalive probes, each > 0, such as 15s,5s,3", func(o *Options, v string) error {
		k, err := parseKeepalive(v)
		if err != nil {
			return err
		}
		o.Keepalive = k
		return nil
	}},
	{keyTCPUserTimeout, "a duration >= 1ms such as 30s (0 = off; Linux only)", durationKey(func(o *Options) *time.Duration { return &o.TCPUserTimeout })},
	{keyConnectWait, "a duration >= 0 such as 30s (0 = fail at once while the server is down)", durationKey(func(o *Options) *time.Duration { return &o.ConnectWait })},
	{keyRetry, "safe or off", enumKey(func(o *Options) *RetryPolicy { return &o.Retry },
		map[string]RetryPolicy{"safe": RetrySafe, "off": RetryOff})},
	{keyRejectReadOnly, "auto, true or false", enumKey(func(o *Options) *ReadOnlyPolicy { return &o.RejectReadOnly },
		map[string]ReadOnlyPolicy{"auto": ReadOnlyAuto, "true": ReadOnlyReject, "false": ReadOnlyAllow})},
	{keyLog, "off, error, warn, info or debug", enumKey(func(o *Options) *LogLevel { return &o.Log },
		map[string]LogLevel{"off": LogOff, "error": LogError, "warn": LogWarn, "info": LogInfo, "debug": LogDebug})},
	{keyLeakThreshold, "a duration >= 0 such as 30s (0 = off)", durationKey(func(o *Options) *time.Duration { return &o.LeakThreshold })},
	{keyReap, "on or off", enumKey(func(o *Options) *bool { return &o.Reap }, map[string]bool{"on": true, "off": false})},
	{keyPasswordFile, "an absolute path such as /run/secrets/db/password", pathKey(func(o *Options) *string { return &o.PasswordFile })},
	{keyUserFile, "an absolute path such as /run/secrets/db/user", pathKey(func(o *Options) *string { return &o.UserFile })},
}

// errBadValue stands for "not one of the allowed values"; ConfigError.Allowed
// says which are.
var errBadValue = errors.New("not an allowed value")

// enumKey sets a field from a fixed set of spellings; ConfigError.Allowed
// lists them.
func enumKey[T any](field func(*Options) *T, values map[string]T) func(*Options, string) error {
	return func(o *Options, v string) error {
		x, ok := values[v]
		if !ok {
			return errBadValue
		}
		*field(o) = x
		return nil
	}
}

func durationKey(field func(*Options) *time.Duration) func(*Options, string) error {
	return func(o *Options, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return err
		}
		if d < 0 {
			return errors.New("negative duration")
		}
		*field(o) = d
		return nil
	}
}

// pathKey sets a file path; validate checks that it is absolute, so that
// Options given in code get the same check.
func pathKey(field func(*Options) *string) func(*Options, string) error {
	return func(o *Options, v string) error {
		*field(o) = v
		return nil
	}
}

func intKey(field func(*Options) *int) func(*Options, string) error {
	return func(o *Options, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil {
			return errors.New("not an integer")
		}
		if n < 0 {
			return errors.New("negative")
		}
		*field(o) = n
		return nil
	}
}

// KnownKeys returns the DSN keys the wrapper understands, in table order.
func KnownKeys() []string {
	names := make([]string, len(dsnKeys))
	for i, k := range dsnKeys {
		names[i] = k.name
	}
	return names
}

// isOurKey reports whether a DSN key belongs to the wrapper. The match
// ignores case: PostgreSQL folds parameter names, so RESILIENT_PING would
// otherwise reach the server.
func isOurKey(name string) bool {
	return len(name) >= len(keyPrefix) && strings.EqualFold(name[:len(keyPrefix)], keyPrefix)
}

// claimKeys moves every resilient_ key out of params into o, deleting it so
// that the inner driver never sees it, then validates o. poolSizing says
// whether the caller owns the *sql.DB and can apply the pool-size keys.
func claimKeys(params map[string]string, o *Options, poolSizing bool) error {
	// Validate in table order rather than map order, so the same DSN always
	// reports the same first error.
	var unknown []string
	for name := range params {
		if isOurKey(name) && findKey(name) == nil {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		name := slices.Min(unknown)
		return &ConfigError{Key: name, Value: params[name], Err: ErrUnknownKey,
			Allowed: "one of " + strings.Join(KnownKeys(), ", ")}
	}
	var given map[string]string // values as written, for error messages
	for i := range dsnKeys {
		k := &dsnKeys[i]
		v, ok := params[k.name]
		if !ok {
			continue
		}
		delete(params, k.name)
		if err := k.set(o, v); err != nil {
			if err == errBadValue {
				err = nil
			}
			return &ConfigError{Key: k.name, Value: v, Allowed: k.allowed, Err: err}
		}
		if given == nil {
			given = make(map[string]string)
		}
		given[k.name] = v
	}
	if err := o.validate(); err != nil {
		if ce, ok := err.(*ConfigError); ok {
			if v, ok := given[ce.Key]; ok {
				ce.Value = v // report what the user wrote, not its normal form
			}
		}
		return err
	}
	if !poolSizing && o.hasPoolSizing() {
		key, v := keyMaxOpenConns, o.MaxOpenConns
		if o.MaxOpenConns == Unset {
			key, v = keyMaxIdleConns, o.MaxIdleConns
		}
		return &ConfigError{Key: key, Value: strconv.Itoa(v),
			Allowed: "pool sizing only through resilientpg.Open or resilientpg.OpenDB, which own the *sql.DB; " +
				"with sql.Open or sql.OpenDB use db.SetMaxOpenConns and db.SetMaxIdleConns"}
	}
	return nil
}

func findKey(name string) *dsnKey {
	for i := range dsnKeys {
		if dsnKeys[i].name == name {
			return &dsnKeys[i]
		}
	}
	return nil
}

// genericDSNKey finds a "resilient_name=" assignment in a DSN whose grammar
// the wrapper does not know. It cannot strip the key there, so it refuses
// rather than let the key reach the server. The "=" keeps a database or host
// named resilient_something from matching.
func genericDSNKey(dsn string) (string, bool) {
	lower := strings.ToLower(dsn)
	for from := 0; ; {
		i := strings.Index(lower[from:], keyPrefix)
		if i < 0 {
			return "", false
		}
		start := from + i
		end := start + len(keyPrefix)
		for end < len(lower) && (lower[end] == '_' || lower[end] >= 'a' && lower[end] <= 'z') {
			end++
		}
		if end < len(lower) && lower[end] == '=' {
			return dsn[start:end], true
		}
		from = end
	}
}
