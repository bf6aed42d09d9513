package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
)

// optsA and optsB set every claimable non-pool key to a non-default value;
// A spells the jitter as a percentage, B as a duration.
func optsA() resilientpg.Options {
	o := resilientpg.DefaultOptions()
	o.Ping = resilientpg.PingAlways
	o.PingIdle = 250 * time.Millisecond
	o.PingTimeout = 750 * time.Millisecond
	o.MaxAge = 10 * time.Minute
	o.MaxAgeJitter = resilientpg.JitterPercent(25)
	o.MaxIdleTime = 3 * time.Minute
	o.ConnectTimeout = 12 * time.Second
	o.ConnectBackoff = 150 * time.Millisecond
	o.ConnectBackoffMax = 3 * time.Second
	o.ProbeInterval = 50 * time.Millisecond
	o.Keepalive = net.KeepAliveConfig{Enable: true, Idle: 20 * time.Second, Interval: 4 * time.Second, Count: 5}
	o.TCPUserTimeout = 45 * time.Second
	o.ConnectWait = 5 * time.Second
	o.Retry = resilientpg.RetryOff
	o.RejectReadOnly = resilientpg.ReadOnlyReject
	o.Log = resilientpg.LogError
	o.LeakThreshold = 90 * time.Second
	o.Reap = false
	return o
}

func optsB() resilientpg.Options {
	o := resilientpg.DefaultOptions()
	o.Ping = resilientpg.PingNever
	o.PingIdle = 3 * time.Second
	o.PingTimeout = 1500 * time.Millisecond
	o.MaxAge = 45 * time.Minute
	o.MaxAgeJitter = resilientpg.JitterDuration(90 * time.Second)
	o.MaxIdleTime = 90 * time.Second
	o.ConnectTimeout = 20 * time.Second
	o.ConnectBackoff = 200 * time.Millisecond
	o.ConnectBackoffMax = 2 * time.Second
	o.ProbeInterval = 20 * time.Millisecond
	o.Keepalive = net.KeepAliveConfig{}
	o.TCPUserTimeout = 0
	o.ConnectWait = 0
	o.Retry = resilientpg.RetryOff
	o.RejectReadOnly = resilientpg.ReadOnlyAllow
	o.Log = resilientpg.LogError
	o.LeakThreshold = 2 * time.Minute
	o.Reap = true
	return o
}

// keysA and keysB are optsA and optsB as DSN keys. pct is how "%" must be
// written: "%25" inside a URL query or a MySQL DSN, "%" in keyword/value.
func keysA(pct string) []string {
	return []string{
		"resilient_ping=always",
		"resilient_ping_idle=250ms",
		"resilient_ping_timeout=750ms",
		"resilient_max_age=10m",
		"resilient_max_age_jitter=25" + pct,
		"resilient_max_idle_time=3m",
		"resilient_connect_timeout=12s",
		"resilient_connect_backoff=150ms",
		"resilient_connect_backoff_max=3s",
		"resilient_probe_interval=50ms",
		"resilient_keepalive=20s,4s,5",
		"resilient_tcp_user_timeout=45s",
		"resilient_connect_wait=5s",
		"resilient_retry=off",
		"resilient_reject_read_only=true",
		"resilient_log=error",
		"resilient_leak_threshold=90s",
		"resilient_reap=off",
	}
}

func keysB() []string {
	return []string{
		"resilient_ping=never",
		"resilient_ping_idle=3s",
		"resilient_ping_timeout=1500ms",
		"resilient_max_age=45m",
		"resilient_max_age_jitter=90s",
		"resilient_max_idle_time=90s",
		"resilient_connect_timeout=20s",
		"resilient_connect_backoff=200ms",
		"resilient_connect_backoff_max=2s",
		"resilient_probe_interval=20ms",
		"resilient_keepalive=off",
		"resilient_tcp_user_timeout=0",
		"resilient_connect_wait=0s",
		"resilient_retry=off",
		"resilient_reject_read_only=false",
		"resilient_log=error",
		"resilient_leak_threshold=2m",
		"resilient_reap=on",
	}
}

// credentialKeys are exercised by TestCredentials (credentials_test.go),
// on servers of its own with real password authentication, in the URL,
// keyword/value and MySQL forms.
var credentialKeys = []string{"resilient_password_file=", "resilient_user_file="}

// poolKeys are the keys only resilientpg.Open and OpenDB accept.
var poolKeys = []string{"resilient_max_open_conns=7", "resilient_max_idle_conns=3"}

func TestDSNForms(t *testing.T) {
	// Every key of the wrapper's table is exercised below, each with a
	// non-default value; a key added to the table must be added here.
	covered := map[string]bool{}
	for _, kv := range slices.Concat(keysA("%"), keysB(), poolKeys, credentialKeys) {
		k, _, _ := strings.Cut(kv, "=")
		covered[k] = true
	}
	for _, k := range resilientpg.KnownKeys() {
		if !covered[k] {
			t.Errorf("DSN key %s (resilientpg.KnownKeys) is not exercised by TestDSNForms: add it to keysA, keysB or poolKeys", k)
		}
	}
	if len(covered) != len(resilientpg.KnownKeys()) {
		t.Errorf("TestDSNForms uses %d keys, resilientpg.KnownKeys has %d: %v", len(covered), len(resilientpg.KnownKeys()), resilientpg.KnownKeys())
	}

	// Parsing the targets needs no server; each subtest that connects
	// requires its own.
	pg := parsePgTarget(t, postgresDSN())
	my := parseMySQLTarget(t, mysqlDSN())

	type form struct {
		name    string
		driver  string        // registered wrapper name
		inner   driver.Driver // for NewConnector, to read back the parsed Options
		require func(testing.TB) string
		dsn     func(extra ...string) string
		pct     string
		check   func(t *testing.T, db *sql.DB, tag string)
	}
	forms := []form{
		{"postgres-url", "resilientpg", stdlib.GetDefaultDriver(), requirePostgres, pg.URL, "%25", checkPgServer},
		{"postgres-kv", "resilientpg", stdlib.GetDefaultDriver(), requirePostgres, pg.KV, "%", checkPgServer},
		{"mysql", "resilientmysql", &mysql.MySQLDriver{}, requireMySQL, my.DSN, "%25", checkMySQLServer},
	}

	for _, f := range forms {
		t.Run(f.name, func(t *testing.T) {
			f.require(t)
			variants := []struct {
				name string
				keys []string
				want resilientpg.Options
			}{
				{"jitter-percent", keysA(f.pct), optsA()},
				{"jitter-duration", keysB(), optsB()},
			}
			for _, v := range variants {
				t.Run(v.name, func(t *testing.T) {
					tag, pass := passThrough(f.driver)
					dsn := f.dsn(append([]string{pass}, v.keys...)...)

					// The keys are parsed into exactly the options they spell.
					c, err := resilientpg.NewConnector(f.inner, resilientpg.DefaultOptions(), dsn)
					if err != nil {
						t.Fatalf("NewConnector: %v", err)
					}
					if got := c.Options(); !reflect.DeepEqual(got, v.want) {
						t.Errorf("parsed options:\n got %+v\nwant %+v", got, v.want)
					}

					// sql.Open with the same DSN works, and the server saw none of them.
					db := openDB(t, f.driver, dsn)
					db.SetMaxOpenConns(2)
					f.check(t, db, tag)
				})
			}

			t.Run("pool-keys", func(t *testing.T) {
				tag, pass := passThrough(f.driver)
				dsn := f.dsn(append([]string{pass, "resilient_ping=always"}, poolKeys...)...)
				db, err := resilientpg.Open(f.driver, dsn)
				if err != nil {
					t.Fatalf("resilientpg.Open: %v", err)
				}
				defer db.Close()
				if got := db.Stats().MaxOpenConnections; got != 7 {
					t.Errorf("MaxOpenConnections = %d, want 7 (resilient_max_open_conns)", got)
				}
				// Hold 7 connections, release them: 3 stay idle (resilient_max_idle_conns).
				ctx := ctxT(t, 10*time.Second)
				conns := make([]*sql.Conn, 0, 7)
				for range 7 {
					sc, err := db.Conn(ctx)
					if err != nil {
						t.Fatalf("db.Conn: %v", err)
					}
					if err := sc.PingContext(ctx); err != nil {
						t.Fatalf("ping: %v", err)
					}
					conns = append(conns, sc)
				}
				if got := db.Stats().OpenConnections; got != 7 {
					t.Errorf("OpenConnections while holding 7 = %d, want 7", got)
				}
				for _, sc := range conns {
					sc.Close()
				}
				if st := db.Stats(); st.Idle != 3 || st.OpenConnections != 3 {
					t.Errorf("after release: Idle=%d Open=%d, want 3 and 3 (resilient_max_idle_conns=3)", st.Idle, st.OpenConnections)
				}
				f.check(t, db, tag)
			})
		})
	}

	// Controls: the bare drivers do send the keys, so the checks above could
	// fail. pgx sends them as startup parameters, mysql as SET statements.
	t.Run("control-bare-drivers-send-keys", func(t *testing.T) {
		for _, c := range []struct {
			name, driver, dsn string
			require           func(testing.TB) string
		}{
			{"pgx-url", "pgx", pg.URL("resilient_ping=always"), requirePostgres},
			{"pgx-kv", "pgx", pg.KV("resilient_ping=always"), requirePostgres},
			{"mysql", "mysql", my.DSN("resilient_ping=always"), requireMySQL},
		} {
			t.Run(c.name, func(t *testing.T) {
				c.require(t)
				db := openDB(t, c.driver, c.dsn)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				err := db.PingContext(ctx)
				cancel()
				switch {
				case err == nil:
					t.Errorf("bare %s accepted resilient_ping: the server-side checks prove nothing", c.driver)
				case !strings.Contains(err.Error(), "resilient_ping"):
					t.Errorf("bare %s failed, but not over resilient_ping: %v", c.driver, err)
				default:
					t.Logf("bare %s: %v", c.driver, err)
				}
			})
		}
	})

	// No server needed: the DSN must be rejected before any connection.
	t.Run("bad-keys-fail-at-open", func(t *testing.T) {
		const pw = "s3cretPW"
		pgp := pg.withPassword(pw)
		myp := my.withPassword(pw)
		for _, c := range []struct {
			name, driver, dsn string
			wantKey           string // "" when the inner driver's parser rejects the DSN
		}{
			{"pg-url-unknown-key", "resilientpg", pgp.URL("resilient_pign=always"), "resilient_pign"},
			{"pg-kv-bad-value", "resilientpg", pgp.KV("resilient_ping=sometimes"), "resilient_ping"},
			{"pg-url-upper-case-key", "resilientpg", pgp.URL("RESILIENT_PING=always"), "RESILIENT_PING"},
			{"pg-kv-negative-age", "resilientpg", pgp.KV("resilient_max_age=-5m"), "resilient_max_age"},
			{"pg-url-jitter-above-age", "resilientpg", pgp.URL("resilient_max_age=1m", "resilient_max_age_jitter=2m"), "resilient_max_age_jitter"},
			{"pg-url-jitter-100pct", "resilientpg", pgp.URL("resilient_max_age_jitter=100%25"), "resilient_max_age_jitter"},
			{"pg-url-pool-key-in-sql-open", "resilientpg", pgp.URL("resilient_max_open_conns=5"), "resilient_max_open_conns"},
			{"pg-kv-zero-ping-timeout", "resilientpg", pgp.KV("resilient_ping_timeout=0s"), "resilient_ping_timeout"},
			{"pg-url-bad-retry", "resilientpg", pgp.URL("resilient_retry=always"), "resilient_retry"},
			{"pg-kv-backoff-max-below-backoff", "resilientpg", pgp.KV("resilient_connect_backoff=2s", "resilient_connect_backoff_max=1s"), "resilient_connect_backoff_max"},
			{"pg-url-raw-percent", "resilientpg", pgp.URL("resilient_max_age_jitter=25%"), ""},
			{"mysql-unknown-key", "resilientmysql", myp.DSN("resilient_max_agee=1m"), "resilient_max_agee"},
			{"mysql-bad-duration", "resilientmysql", myp.DSN("resilient_ping_idle=soon"), "resilient_ping_idle"},
			{"mysql-pool-key-in-sql-open", "resilientmysql", myp.DSN("resilient_max_idle_conns=2"), "resilient_max_idle_conns"},
			{"mysql-raw-percent", "resilientmysql", myp.DSN("resilient_max_age_jitter=25%"), ""},
		} {
			t.Run(c.name, func(t *testing.T) {
				if !strings.Contains(c.dsn, pw) {
					t.Fatalf("test bug: DSN %q lacks the password", c.dsn)
				}
				db, err := sql.Open(c.driver, c.dsn)
				if err == nil {
					db.Close()
					t.Fatalf("sql.Open accepted %s; it must fail at Open, before any query", c.name)
				}
				if strings.Contains(err.Error(), pw) {
					t.Errorf("error leaks the password: %v", err)
				}
				if c.wantKey != "" {
					var ce *resilientpg.ConfigError
					if !errors.As(err, &ce) {
						t.Fatalf("error is a %T, want *resilientpg.ConfigError: %v", err, err)
					}
					if ce.Key != c.wantKey {
						t.Errorf("ConfigError.Key = %q, want %q (%v)", ce.Key, c.wantKey, err)
					}
				}
				t.Logf("sql.Open: %v", err)
			})
		}
	})
}

// passThrough returns a unique tag and a non-resilient DSN key carrying it,
// to show that the inner driver's own keys still reach the server.
func passThrough(driverName string) (tag, kv string) {
	if driverName == "resilientmysql" {
		// go-sql-driver/mysql sends unknown keys as SET statements.
		return "1234", "wait_timeout=1234"
	}
	tag = uniqueAppName("dsn")
	return tag, "application_name=" + tag
}

func checkPgServer(t *testing.T, db *sql.DB, appName string) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	// Several rounds, so used connections go through checkout.
	for i := range 4 {
		var n int
		if err := db.QueryRowContext(ctx, `SELECT count(*) FROM pg_settings WHERE name ILIKE 'resilient%'`).Scan(&n); err != nil {
			t.Fatalf("round %d: pg_settings: %v", i, err)
		}
		if n != 0 {
			t.Errorf("server has %d resilient* settings, want 0", n)
		}
		var isNull bool
		var app string
		if err := db.QueryRowContext(ctx, `SELECT current_setting('resilient_ping', true) IS NULL, current_setting('application_name')`).Scan(&isNull, &app); err != nil {
			t.Fatalf("round %d: current_setting: %v", i, err)
		}
		if !isNull {
			t.Errorf("current_setting('resilient_ping', true) is not NULL: the key reached the server")
		}
		if app != appName {
			t.Errorf("application_name = %q, want %q: the inner driver's own keys must pass through", app, appName)
		}
	}
}

func checkMySQLServer(t *testing.T, db *sql.DB, waitTimeout string) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	for i := range 4 {
		// Had a resilient_ key reached the driver, its SET would have failed
		// the connection, so success is the proof; the passed-through key
		// shows that the driver's own keys still arrive.
		var got string
		if err := db.QueryRowContext(ctx, `SELECT @@SESSION.wait_timeout`).Scan(&got); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if got != waitTimeout {
			t.Errorf("@@SESSION.wait_timeout = %s, want %s: the driver's own params must pass through", got, waitTimeout)
		}
	}
	rows, err := db.QueryContext(ctx, `SHOW SESSION VARIABLES LIKE 'resilient%'`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		t.Errorf("server has a resilient* variable")
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
}
