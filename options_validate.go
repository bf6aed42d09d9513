package resilientpg

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Validation of Options, and the error that names the bad key or field.

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
