package resilientpg

import (
	"context"
	"errors"
	"log/slog"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

const testPassword = "s3cretPW"

// dsnForms builds a DSN of each supported grammar carrying one extra key.
var dsnForms = []struct {
	name  string
	build func(key, value string) string
	parse func(dsn string, o *Options) (params map[string]string, err error)
}{
	{"pg-url", func(k, v string) string {
		return "postgres://app:" + testPassword + "@db.example:5432/app?sslmode=disable&application_name=svc&" + k + "=" + url.QueryEscape(v)
	}, parsePg},
	{"pg-keyword", func(k, v string) string {
		return "host=db.example user=app password=" + testPassword + " dbname=app application_name=svc " + k + "=" + v
	}, parsePg},
	{"mysql", func(k, v string) string {
		return "app:" + testPassword + "@tcp(db.example:3306)/app?parseTime=true&application_name=svc&" + k + "=" + url.QueryEscape(v)
	}, func(dsn string, o *Options) (map[string]string, error) {
		cfg, err := parseMySQLConfig(dsn, o, true)
		if err != nil {
			return nil, err
		}
		return cfg.Params, nil
	}},
}

func parsePg(dsn string, o *Options) (map[string]string, error) {
	cfg, err := parsePgConfig(dsn, o, true)
	if err != nil {
		return nil, err
	}
	return cfg.RuntimeParams, nil
}

func TestDSNKeysParsed(t *testing.T) {
	cases := []struct {
		key, value string
		want       func(*Options)
	}{
		{keyPing, "always", func(o *Options) { o.Ping = PingAlways }},
		{keyPing, "never", func(o *Options) { o.Ping = PingNever }},
		{keyPing, "idle", func(o *Options) { o.Ping = PingIdle }},
		{keyPingIdle, "250ms", func(o *Options) { o.PingIdle = 250 * time.Millisecond }},
		{keyPingIdle, "0", func(o *Options) { o.PingIdle = 0 }},
		{keyPingTimeout, "500ms", func(o *Options) { o.PingTimeout = 500 * time.Millisecond }},
		{keyMaxAge, "1h", func(o *Options) { o.MaxAge = time.Hour }},
		{keyMaxAge, "0", func(o *Options) { o.MaxAge = 0 }},
		{keyMaxAgeJitter, "25%", func(o *Options) { o.MaxAgeJitter = JitterPercent(25) }},
		{keyMaxAgeJitter, "2.5%", func(o *Options) { o.MaxAgeJitter = JitterPercent(2.5) }},
		{keyLog, "debug", func(o *Options) { o.Log = LogDebug }},
		{keyLog, "warn", func(o *Options) { o.Log = LogWarn }},
		{keyLog, "off", func(o *Options) { o.Log = LogOff }},
		{keyLeakThreshold, "30s", func(o *Options) { o.LeakThreshold = 30 * time.Second }},
		{keyLeakThreshold, "0", func(o *Options) { o.LeakThreshold = 0 }},
		{keyMaxAgeJitter, "2m", func(o *Options) { o.MaxAgeJitter = JitterDuration(2 * time.Minute) }},
		{keyMaxIdleTime, "5m", func(o *Options) { o.MaxIdleTime = 5 * time.Minute }},
		{keyMaxOpenConns, "20", func(o *Options) { o.MaxOpenConns = 20 }},
		{keyMaxOpenConns, "0", func(o *Options) { o.MaxOpenConns = 0 }},
		{keyMaxIdleConns, "4", func(o *Options) { o.MaxIdleConns = 4 }},
		{keyConnectTimeout, "10s", func(o *Options) { o.ConnectTimeout = 10 * time.Second }},
		{keyConnectBackoff, "50ms", func(o *Options) { o.ConnectBackoff = 50 * time.Millisecond }},
		{keyConnectBackoffMax, "5s", func(o *Options) { o.ConnectBackoffMax = 5 * time.Second }},
		{keyConnectWait, "0", func(o *Options) { o.ConnectWait = 0 }},
		{keyConnectWait, "1m", func(o *Options) { o.ConnectWait = time.Minute }},
		{keyRetry, "off", func(o *Options) { o.Retry = RetryOff }},
		{keyRetry, "safe", func(o *Options) { o.Retry = RetrySafe }},
		{keyRejectReadOnly, "true", func(o *Options) { o.RejectReadOnly = ReadOnlyReject }},
		{keyRejectReadOnly, "false", func(o *Options) { o.RejectReadOnly = ReadOnlyAllow }},
		{keyRejectReadOnly, "auto", func(o *Options) { o.RejectReadOnly = ReadOnlyAuto }},
		{keyReap, "off", func(o *Options) { o.Reap = false }},
		{keyReap, "on", func(o *Options) { o.Reap = true }},
		{keyPasswordFile, "/run/secrets/db/password", func(o *Options) { o.PasswordFile = "/run/secrets/db/password" }},
		{keyPasswordFile, "/var/run/secrets/db/..data/password", func(o *Options) { o.PasswordFile = "/var/run/secrets/db/..data/password" }},
	}
	for _, form := range dsnForms {
		for _, tc := range cases {
			t.Run(form.name+"/"+tc.key+"="+tc.value, func(t *testing.T) {
				got := DefaultOptions()
				params, err := form.parse(form.build(tc.key, tc.value), &got)
				if err != nil {
					t.Fatal(err)
				}
				want := DefaultOptions()
				tc.want(&want)
				if !reflect.DeepEqual(got, want) {
					t.Errorf("options = %+v, want %+v", got, want)
				}
				for k := range params {
					if isOurKey(k) {
						t.Errorf("%s survived into the inner config", k)
					}
				}
				if params["application_name"] != "svc" {
					t.Errorf("the inner driver's own keys must pass through: %v", params)
				}
			})
		}
	}
}

func TestDSNKeysRejected(t *testing.T) {
	cases := []struct {
		key, value string
		allowed    string // a piece of ConfigError.Allowed
	}{
		{keyPing, "sometimes", "always, idle or never"},
		{keyPing, "ALWAYS", "always, idle or never"},
		{keyPingIdle, "1", "duration"},
		{keyPingIdle, "-1s", "duration >= 0"},
		{keyPingTimeout, "0", "duration > 0"},
		{keyPingTimeout, "soon", "duration > 0"},
		{keyMaxAge, "-5m", "duration >= 0"},
		{keyMaxAge, "30", "duration"},
		{keyMaxAgeJitter, "100%", "below 100%"},
		{keyMaxAgeJitter, "-1%", "0%"},
		{keyMaxAgeJitter, "x%", "percentage"},
		{keyMaxAgeJitter, "NaN%", "percentage"},
		{keyMaxAgeJitter, "40m", "below resilient_max_age"},
		{keyMaxIdleTime, "forever", "duration"},
		{keyMaxOpenConns, "-1", "integer >= 0"},
		{keyMaxOpenConns, "ten", "integer"},
		{keyMaxIdleConns, "1.5", "integer"},
		{keyConnectTimeout, "0", "duration > 0"},
		{keyConnectBackoff, "0s", "duration > 0"},
		{keyConnectBackoffMax, "10ms", "resilient_connect_backoff"},
		{keyConnectWait, "-1s", "duration >= 0"},
		{keyRetry, "always", "safe or off"},
		{keyRejectReadOnly, "yes", "auto, true or false"},
		{keyLog, "verbose", "off, error, warn, info or debug"},
		{keyLog, "WARN", "off, error, warn, info or debug"},
		{keyLeakThreshold, "-1s", "duration >= 0"},
		{keyLeakThreshold, "10", "duration"},
		{keyReap, "false", "on or off"},
		{keyReap, "OFF", "on or off"},
		{"resilient_pingg", "always", "one of resilient_ping, "},
		{"RESILIENT_PING", "always", "one of resilient_ping, "},
		{"resilient_", "x", "one of"},
		{keyPasswordFile, "secrets/password", "absolute path"},
		{keyPasswordFile, "~/pw", "absolute path"},
		{keyUserFile, "user", "absolute path"},
		{keyUserFile, "/run/secrets/db/user", "together with resilient_password_file"},
	}
	for _, form := range dsnForms {
		for _, tc := range cases {
			t.Run(form.name+"/"+tc.key+"="+tc.value, func(t *testing.T) {
				o := DefaultOptions()
				_, err := form.parse(form.build(tc.key, tc.value), &o)
				var ce *ConfigError
				if !errors.As(err, &ce) {
					t.Fatalf("err = %v, want a *ConfigError", err)
				}
				if ce.Key != tc.key || ce.Value != tc.value || !strings.Contains(ce.Allowed, tc.allowed) {
					t.Errorf("ConfigError{Key %q, Value %q, Allowed %q}, want key %q value %q allowed ~%q",
						ce.Key, ce.Value, ce.Allowed, tc.key, tc.value, tc.allowed)
				}
				msg := err.Error()
				if !strings.Contains(msg, tc.key) || !strings.Contains(msg, tc.value) {
					t.Errorf("message %q must name the key and the value", msg)
				}
				if strings.Contains(msg, testPassword) {
					t.Errorf("message %q leaks the password", msg)
				}
			})
		}
	}
}

// TestLoggerNeedsLevel: a Logger with logging off would be silently
// unused, so it is an error that says what to set.
func TestLoggerNeedsLevel(t *testing.T) {
	o := DefaultOptions()
	o.Logger = slog.New(slog.DiscardHandler)
	_, err := NewConnector(&fakeConnector{}, o)
	var ce *ConfigError
	if !errors.As(err, &ce) || ce.Key != keyLog || !strings.Contains(err.Error(), "Options.Logger") {
		t.Fatalf("Logger with Log off: %v, want a ConfigError for resilient_log naming Options.Logger", err)
	}
	o.Log = LogWarn
	if _, err := NewConnector(&fakeConnector{}, o); err != nil {
		t.Fatalf("Logger with Log=warn: %v", err)
	}
}

func TestNewConnectorRejects(t *testing.T) {
	f := &fakeConnector{}
	both := DefaultOptions()
	both.MaxAgeJitter = Jitter{Percent: 5, Duration: time.Second}
	pool := DefaultOptions()
	pool.MaxOpenConns = 5
	withCreds := DefaultOptions()
	withCreds.Credentials = func(context.Context) (Credentials, error) { return Credentials{Password: "x"}, nil }
	withFile := DefaultOptions()
	withFile.PasswordFile = "/run/secrets/pw"
	withBoth := withCreds
	withBoth.PasswordFile = "/run/secrets/pw"
	for _, tc := range []struct {
		name  string
		inner any
		opts  Options
		dsn   []string
		want  string
	}{
		{"zero options", f, Options{}, nil, "DefaultOptions()"},
		{"jitter both ways", f, both, nil, "not both"},
		{"pool sizing on a bare connector", f, pool, nil, "resilientpg.OpenDB"},
		{"connector with a DSN", f, DefaultOptions(), []string{"x"}, "driver.Driver"},
		{"nil inner", nil, DefaultOptions(), nil, "nil"},
		{"not a driver", 42, DefaultOptions(), nil, "int"},
		{"key in a foreign DSN", fakeDriver{f}, DefaultOptions(), []string{"file:x?resilient_ping=always"}, "resilient_ping"},
		{"bad key in a pgx DSN", stdlib.GetDefaultDriver(), DefaultOptions(), []string{"postgres://h/db?resilient_ping=x"}, "resilient_ping"},
		{"credentials on a foreign connector", f, withCreds, nil, "Options.Credentials"},
		{"a password file on a foreign driver", fakeDriver{f}, withFile, []string{"x"}, "resilient_password_file"},
		{"credentials and a file", stdlib.GetDefaultDriver(), withBoth, []string{"postgres://h/db"}, "one source of credentials"},
		{"a file key with a registered pgx config", stdlib.GetDefaultDriver(), withFile, []string{"registeredConnConfig1"}, "resilient_password_file"},
	} {
		_, err := NewConnector(tc.inner, tc.opts, tc.dsn...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want it to mention %q", tc.name, err, tc.want)
		}
	}
	if _, err := OpenDB(f, pool); err != nil {
		t.Errorf("OpenDB must accept pool sizing: %v", err)
	}
	// A database named like a key is not a key.
	if _, err := NewConnector(fakeDriver{f}, DefaultOptions(), "file:resilient_app.db"); err != nil {
		t.Errorf("a name containing resilient_ was taken for a key: %v", err)
	}
}

// TestRejectReadOnlyAuto: auto means "on" exactly when the DSN asks for a
// writable server.
func TestRejectReadOnlyAuto(t *testing.T) {
	for _, tc := range []struct {
		dsn  string
		want bool
	}{
		{"postgres://a,b/db?target_session_attrs=read-write", true},
		{"host=a,b dbname=db target_session_attrs=primary", true},
		{"postgres://a,b/db?target_session_attrs=any", false},
		{"postgres://a/db", false},
		{"postgres://a/db?resilient_reject_read_only=true", true},
		{"postgres://a,b/db?target_session_attrs=read-write&resilient_reject_read_only=false", false},
	} {
		c, err := pgDriver.connector(tc.dsn, DefaultOptions(), false)
		if err != nil {
			t.Fatal(err)
		}
		if c.rejectReadOnly != tc.want {
			t.Errorf("%s: reject read-only = %v, want %v", tc.dsn, c.rejectReadOnly, tc.want)
		}
	}
}

// TestCredentialOptionsInCode: the Options fields get the DSN keys'
// checks, and a MySQL DSN needs its path's slashes escaped (the driver
// splits the DSN at its last "/").
func TestCredentialOptionsInCode(t *testing.T) {
	o := DefaultOptions()
	o.PasswordFile = "relative/pw"
	if _, err := NewConnector(stdlib.GetDefaultDriver(), o, "postgres://h/db"); err == nil || !strings.Contains(err.Error(), "absolute path") {
		t.Errorf("relative PasswordFile: %v", err)
	}
	o.PasswordFile, o.UserFile = "/run/pw", "/run/user"
	c, err := NewConnector(stdlib.GetDefaultDriver(), o, "postgres://h/db")
	if err != nil || c.creds == nil || c.creds.user == nil {
		t.Fatalf("files in code: %v", err)
	}
	c, err = mysqlDriver.connector("app@tcp(h:3306)/db?resilient_password_file=%2Frun%2Fsecrets%2Fpw", DefaultOptions(), false)
	if err != nil || c.opts.PasswordFile != "/run/secrets/pw" || c.creds == nil {
		t.Fatalf("escaped path in a MySQL DSN: %v", err)
	}
}
