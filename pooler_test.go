package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"reflect"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

func bouncerErr(msg string) error {
	return &pgconn.PgError{Severity: "FATAL", Code: "08P01", Message: msg}
}

// TestPoolerReasons: every PgBouncer reason sorts into connection gone,
// server unavailable (retry later) or the caller's error; a real
// PostgreSQL 08P01 (protocol violation, with a detail or another message)
// stays class 08.
func TestPoolerReasons(t *testing.T) {
	for _, tc := range []struct {
		msg        string
		class      Class
		retryLater bool
	}{
		{"server login has been failing, try again later (server_login_retry)", ClassCannotConnect, true},
		{"query_wait_timeout", ClassCannotConnect, true},
		{"pgbouncer cannot connect to server", ClassCannotConnect, true},
		{"client_login_timeout (server down)", ClassCannotConnect, true},
		{"no more connections allowed (max_client_conn)", ClassCannotConnect, false},
		{"server conn crashed?", ClassConnLost, false},
		{"query timeout", ClassConnLost, false},
		{"database removed", ClassConnLost, false},
		{"client_idle_timeout", ClassSessionTimeout, false},
		{"idle transaction timeout", ClassSessionTimeout, false},
		{"no such database: app", ClassAuth, false},
		{"no such user: app", ClassAuth, false},
		{"password authentication failed", ClassAuth, false},
		{"SASL authentication failed", ClassAuth, false},
		{"unsupported startup parameter: search_path", ClassOther, false},
		{"invalid command 'x', use SHOW HELP;", ClassOther, false},
		{"invalid message format", ClassConnLost, false}, // PostgreSQL's own 08P01
	} {
		err := bouncerErr(tc.msg)
		if got := Classify(err); got != tc.class {
			t.Errorf("%q: class %v, want %v", tc.msg, got, tc.class)
		}
		if got := poolerRetryLater(err); got != tc.retryLater {
			t.Errorf("%q: retry later %v, want %v", tc.msg, got, tc.retryLater)
		}
	}
	pg := &pgconn.PgError{Code: "08P01", Message: "server login has been failing", Detail: "from PostgreSQL itself"}
	if poolerRetryLater(pg) || Classify(pg) != ClassConnLost {
		t.Errorf("an 08P01 with a detail is PostgreSQL's, not PgBouncer's")
	}
}

// TestPoolerRetryLaterWaits: PgBouncer answers statements with "server
// login has been failing" for a while after its server came back, and
// accepts connects meanwhile. A statement so refused did not run: the
// wrapper discards its connection, closes the gate, and the connect that
// database/sql's retry makes waits for a probe whose round trip gets
// through; the caller succeeds once the pooler serves again, having run
// the statement once.
func TestPoolerRetryLaterWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		loginFailing := bouncerErr("server login has been failing, try again later (server_login_retry)")
		var serving atomic.Bool
		c, f := newFakeConnector(shapePgx, opts(nil))
		f.onNew = func(fc *fakeConn) {
			fc.pingErr = func(context.Context) error {
				if serving.Load() {
					return nil
				}
				return loginFailing
			}
		}
		db := sql.OpenDB(c)
		defer db.Close()
		holdAndRelease(t, db, 2)
		for i := range 2 {
			f.conn(i).execErr = loginFailing // pooled connections get the refusal
		}
		back := 2 * time.Second
		go func() {
			time.Sleep(back)
			serving.Store(true)
		}()
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := db.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
			t.Fatalf("Exec: %v", err)
		}
		took := time.Since(start)
		s := c.Stats()
		var execs int64
		for i := range int(f.opens.Load()) {
			execs += f.conn(i).autoExecs.Load()
		}
		if took < back || took > back+50*time.Millisecond {
			t.Errorf("the statement succeeded after %v, want within 50 ms of the pooler serving again at %v", took, back)
		}
		if s.Retries[ReasonUnavailable] != 2 || execs != 3 {
			t.Errorf("retries %v, statements reaching the fakes %d: want 2 refused and 1 run", s.Retries, execs)
		}
		// Probed every probe interval (30 ms on average) meanwhile: the
		// pooler answers from its own state.
		if s.Gate.Probes < 40 || s.Gate.Probes > 80 || s.Gate.Outages != 1 {
			t.Errorf("%d probes in %d outages during %v, want one outage, probed about every 30 ms", s.Gate.Probes, s.Gate.Outages, back)
		}
	})
}

// TestProbeKinds: what a failed dial costs the server sets the pace.
func TestProbeKinds(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want probeKind
	}{
		{"refused", errRefused, probeRefused},
		{"closed before the server spoke", errors.Join(errors.New("failed to receive message"), errUnexpectedEOF()), probeRefused},
		{"standby", &targetMismatchError{errors.New("read only connection")}, probeSoon},
		{"standby beside a refused host", errors.Join(errRefused, &targetMismatchError{errors.New("read only connection")}), probeSoon},
		{"pooler waiting for its server", bouncerErr("server login has been failing, try again later (server_login_retry)"), probeRefused},
		{"starting up", &pgconn.PgError{Code: "57P03", Message: "the database system is starting up"}, probeCostly},
		{"too many clients", &pgconn.PgError{Code: "53300"}, probeCostly},
		{"dial timeout", context.DeadlineExceeded, probeCostly},
		{"unknown", errors.New("tls: handshake failure"), probeCostly},
	} {
		if got := probeKindOf(tc.err); got != tc.want {
			t.Errorf("%s: kind %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestMultiHostConnectTimeout: a multi-host DSN without connect_timeout
// gets a bound per host, so a black-holed first host cannot use up the
// caller's deadline; the DSN's own setting, a single host, or a single
// host's TLS-then-plain fallback are left alone.
func TestMultiHostConnectTimeout(t *testing.T) {
	for _, tc := range []struct {
		dsn  string
		want time.Duration
	}{
		{"postgres://u@a:5432,b:5432/db", defaultHostConnectTimeout},
		{"host=a,b user=u", defaultHostConnectTimeout},
		{"postgres://u@a:5432,b:5432/db?connect_timeout=7", 7 * time.Second},
		{"postgres://u@a/db", 0},
		{"postgres://u@a/db?sslmode=prefer", 0},
	} {
		c, err := NewConnector(pgDriverStd(), DefaultOptions(), tc.dsn)
		if err != nil {
			t.Fatalf("%s: %v", tc.dsn, err)
		}
		if got := innerPgConfig(t, c).ConnectTimeout; got != tc.want {
			t.Errorf("%s: connect timeout %v, want %v", tc.dsn, got, tc.want)
		}
	}
}

// TestPeekAfterLoss: a connection returned a moment ago is not peeked
// (peekAfterIdle), unless a statement on another connection lost its
// server within lossPeekWindow, before or after this one came back: then
// it is, and one the server closed is discarded before a statement is sent
// into it.
func TestPeekAfterLoss(t *testing.T) {
	const none = -1
	for _, tc := range []struct {
		name                 string
		returnedAgo, lostAgo time.Duration // lostAgo none: no loss
		peeked               bool
	}{
		{"no loss", 0, none, false},
		{"loss as it came back", 0, 0, true},
		{"loss after it came back", peekAfterIdle / 2, peekAfterIdle / 4, true},
		{"loss within the window, before it came back", 0, lossPeekWindow / 2, true},
		{"loss past the window", 0, 2 * lossPeekWindow, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.Ping = PingNever }))
			w, _ := connect(c, f)
			client, server := tcpPair(t)
			w.sock = newSockCheck(client)
			server.Close()
			if st := waitState(w.sock, sockClosed); st != sockClosed {
				t.Fatalf("socket state %v after the peer closed", st)
			}
			now := time.Now()
			w.lastActive = now.Add(-tc.returnedAgo)
			if tc.lostAgo != none {
				c.lost(now.Add(-tc.lostAgo), false)
			}
			err := w.ResetSession(context.Background())
			if got := errors.Is(err, driver.ErrBadConn); got != tc.peeked {
				t.Fatalf("err %v: discarded %v, want %v", err, got, tc.peeked)
			}
		})
	}
}

func errUnexpectedEOF() error { return io.ErrUnexpectedEOF }

func pgDriverStd() driver.Driver { return stdlib.GetDefaultDriver() }

// innerPgConfig reads the pgx configuration of the wrapper's own stdlib
// connector (an unexported type with an exported embedded field).
func innerPgConfig(t *testing.T, c *Connector) pgx.ConnConfig {
	t.Helper()
	v := reflect.Indirect(reflect.ValueOf(c.inner)).FieldByName("ConnConfig")
	if !v.IsValid() {
		t.Fatalf("inner connector %T has no ConnConfig", c.inner)
	}
	return v.Interface().(pgx.ConnConfig)
}
