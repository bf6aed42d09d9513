package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
)

// credServer is a fake inner connector that runs the wrapper's mysql
// credentials hook the way go-sql-driver/mysql does (on a copy of the
// config, before dialing) and then checks the result like a server would.
type credServer struct {
	*fakeConnector
	c *Connector

	mu       sync.Mutex
	password string // the one the server accepts
	refusal  error  // what it answers otherwise
	logins   []string
	beforeAt []time.Time // when each connect reached the hook
}

// newCredServer wraps a pgx-like fake with o's credentials. NewConnector
// refuses credentials for a connector it did not build, so the source is
// set here, as mysqlConnector sets it.
func newCredServer(o Options, password string) (*Connector, *credServer) {
	s := &credServer{fakeConnector: &fakeConnector{shape: shapePgx}, password: password,
		refusal: &pgconn.PgError{Severity: "FATAL", Code: "28P01", Message: "password authentication failed"}}
	plain := o
	plain.Credentials, plain.PasswordFile, plain.UserFile = nil, "", ""
	c, err := NewConnector(s, plain)
	if err != nil {
		panic(err)
	}
	c.opts = o
	c.creds = newCredSource(&c.opts)
	s.c = c
	return c, s
}

func (s *credServer) Connect(ctx context.Context) (driver.Conn, error) {
	cfg := mysql.NewConfig()
	cfg.User = "dsn_user"
	s.mu.Lock()
	s.beforeAt = append(s.beforeAt, time.Now())
	s.mu.Unlock()
	if s.c.creds != nil { // as mysqlConnector installs the hook
		if err := mysqlBeforeConnect(s.c)(ctx, cfg); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.logins = append(s.logins, cfg.User+":"+cfg.Passwd)
	ok, refusal := cfg.Passwd == s.password, s.refusal
	s.mu.Unlock()
	if !ok {
		return nil, refusal
	}
	return s.fakeConnector.Connect(ctx)
}

func (s *credServer) rotate(password string) {
	s.mu.Lock()
	s.password = password
	s.mu.Unlock()
}

// rotatingFunc is an Options.Credentials that hands out the current
// password, counting calls; block, if set, holds each call until closed.
type rotatingFunc struct {
	mu       sync.Mutex
	password string
	ttl      time.Duration // 0: no Expires
	err      error
	block    chan struct{}
	calls    atomic.Int64
	ctxs     []context.Context
}

func (r *rotatingFunc) fn(ctx context.Context) (Credentials, error) {
	r.calls.Add(1)
	r.mu.Lock()
	r.ctxs = append(r.ctxs, ctx)
	block := r.block
	r.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return Credentials{}, ctx.Err()
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	cr := Credentials{User: "app", Password: r.password}
	if r.ttl > 0 {
		cr.Expires = time.Now().Add(r.ttl)
	}
	return cr, r.err
}

func (r *rotatingFunc) set(password string) {
	r.mu.Lock()
	r.password = password
	r.mu.Unlock()
}

func credOpts(r *rotatingFunc) Options {
	return opts(func(o *Options) { o.Credentials = r.fn })
}

// TestCredentialsSingleFlight: 20 connects at once share one call; without
// Expires the next connect calls again.
func TestCredentialsSingleFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &rotatingFunc{password: "pw1", block: make(chan struct{})}
		c, s := newCredServer(credOpts(r), "pw1")
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				if _, err := c.Connect(context.Background()); err != nil {
					t.Errorf("Connect: %v", err)
				}
			})
		}
		synctest.Wait()
		if n := r.calls.Load(); n != 1 {
			t.Errorf("%d calls while 20 connects wait, want 1", n)
		}
		close(r.block)
		wg.Wait()
		if _, err := c.Connect(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := r.calls.Load(); n != 2 {
			t.Errorf("%d calls after a later connect, want 2: a result without Expires is not reused", n)
		}
		if len(s.logins) != 21 || s.logins[0] != "app:pw1" {
			t.Errorf("logins %d, first %q; want 21 as app:pw1", len(s.logins), s.logins[0])
		}
	})
}

// TestCredentialsReuseUntilExpiry: a 15-minute token is reused for 14
// minutes (the 1-minute margin), a 30-second one for 27 s (10 %).
func TestCredentialsReuseUntilExpiry(t *testing.T) {
	for _, tc := range []struct {
		ttl, reuse time.Duration
	}{{15 * time.Minute, 14 * time.Minute}, {30 * time.Second, 27 * time.Second}} {
		synctest.Test(t, func(t *testing.T) {
			r := &rotatingFunc{password: "pw1", ttl: tc.ttl}
			c, _ := newCredServer(credOpts(r), "pw1")
			connectOK := func() {
				t.Helper()
				if _, err := c.Connect(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			connectOK()
			time.Sleep(tc.reuse - time.Millisecond)
			connectOK()
			if n := r.calls.Load(); n != 1 {
				t.Errorf("ttl %v: %d calls within %v, want 1", tc.ttl, n, tc.reuse)
			}
			time.Sleep(time.Millisecond)
			connectOK()
			if n := r.calls.Load(); n != 2 {
				t.Errorf("ttl %v: %d calls at %v, want a new one", tc.ttl, n, tc.reuse)
			}
		})
	}
}

// TestCredentialsBoundedContext: the function gets a deadline although
// database/sql's opener gives none, and a caller giving up does not
// cancel the call another caller waits for.
func TestCredentialsBoundedContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &rotatingFunc{password: "pw1", block: make(chan struct{})}
		c, _ := newCredServer(opts(func(o *Options) { o.Credentials = r.fn; o.ConnectTimeout = 10 * time.Second }), "pw1")
		impatient, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { _, err := c.Connect(impatient); errc <- err }()
		synctest.Wait()
		done := make(chan error, 1)
		go func() { _, err := c.Connect(context.Background()); done <- err }()
		synctest.Wait()
		cancel()
		err := <-errc
		var ce *CredentialError
		if !errors.As(err, &ce) || !errors.Is(err, context.Canceled) || ce.Source != "Options.Credentials" {
			t.Errorf("cancelled caller: %v, want a CredentialError from Options.Credentials wrapping context.Canceled", err)
		}
		r.mu.Lock()
		dl, ok := r.ctxs[0].Deadline()
		fnErr := r.ctxs[0].Err()
		r.mu.Unlock()
		if !ok || time.Until(dl) > 10*time.Second {
			t.Errorf("the function's context: deadline %v (set %v), want within the connect timeout", dl, ok)
		}
		if fnErr != nil {
			t.Errorf("the call was cancelled with its first caller: %v", fnErr)
		}
		close(r.block)
		if err := <-done; err != nil {
			t.Errorf("the patient caller: %v", err)
		}
		if r.calls.Load() != 1 {
			t.Errorf("%d calls, want 1 shared", r.calls.Load())
		}
	})
}

// TestCredentialsAuthRefresh: the server refuses a reused token after a
// rotation; the connect calls the function again at once and succeeds,
// without closing the gate. A refusal of fresh credentials is not retried.
func TestCredentialsAuthRefresh(t *testing.T) {
	for _, refusal := range []error{
		&pgconn.PgError{Severity: "FATAL", Code: "28P01"}, &pgconn.PgError{Severity: "FATAL", Code: "28000"},
		&mysql.MySQLError{Number: 1045, Message: "Access denied"}, &mysql.MySQLError{Number: 1698},
	} {
		t.Run(refusal.Error(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				r := &rotatingFunc{password: "pw1", ttl: 15 * time.Minute}
				c, s := newCredServer(credOpts(r), "pw1")
				s.refusal = refusal
				if _, err := c.Connect(context.Background()); err != nil {
					t.Fatal(err)
				}
				r.set("pw2")
				s.rotate("pw2")
				start := time.Now()
				if _, err := c.Connect(context.Background()); err != nil {
					t.Fatalf("connect after rotation: %v", err)
				}
				if r.calls.Load() != 2 || c.creds.refreshes.Load() != 1 || c.gate.dials.Load() != 3 || time.Since(start) != 0 {
					t.Errorf("calls %d, refreshes %d, dials %d after %v; want 2, 1, 3 at once",
						r.calls.Load(), c.creds.refreshes.Load(), c.gate.dials.Load(), time.Since(start))
				}
				// The server now wants a password the function does not have:
				// one refresh, then the refusal, at once, gate open.
				s.rotate("pw3")
				before := c.gate.dials.Load()
				_, err := c.Connect(context.Background())
				if !errors.Is(err, refusal) || c.gate.dials.Load()-before != 2 || time.Since(start) != 0 {
					t.Errorf("wrong password: %v after %d dials; want the refusal after 2", err, c.gate.dials.Load()-before)
				}
				if st := c.Stats().Gate.State; st != ServerUp {
					t.Errorf("gate %v after auth failures, want up", st)
				}
				// Just fetched (no Expires: fetched per connect): not retried.
				r.mu.Lock()
				r.ttl = 0
				r.mu.Unlock()
				time.Sleep(15 * time.Minute) // the cached token is gone
				before = c.gate.dials.Load()
				if _, err := c.Connect(context.Background()); !errors.Is(err, refusal) || c.gate.dials.Load()-before != 1 {
					t.Errorf("fresh credentials refused: %v after %d dials, want 1", err, c.gate.dials.Load()-before)
				}
			})
		})
	}
}

// TestCredentialErrorsKeepGate: a failing function fails the connect at
// once with an error naming it, even when its error wraps a refused dial
// to a secret store; the gate neither closes while up nor opens while down.
func TestCredentialErrorsKeepGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		vault := fmt.Errorf("vault: %w", syscall.ECONNREFUSED)
		r := &rotatingFunc{password: "pw1", err: vault}
		c, s := newCredServer(credOpts(r), "pw1")
		start := time.Now()
		_, err := c.Connect(context.Background())
		var ce *CredentialError
		if !errors.As(err, &ce) || ce.Source != "Options.Credentials" || !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) != 0 {
			t.Fatalf("err %v after %v, want a CredentialError at once", err, time.Since(start))
		}
		if !strings.Contains(err.Error(), "Options.Credentials") || strings.Contains(err.Error(), "pw1") {
			t.Errorf("message %q: want it to name Options.Credentials and not the password", err)
		}
		if st := c.Stats().Gate; st.State != ServerUp || st.Outages != 0 {
			t.Errorf("gate %+v, want up and no outage", st)
		}
		if n := c.Stats().ConnectFailures[ClassAuth]; n != 1 {
			t.Errorf("ConnectFailures[auth] = %d, want 1", n)
		}
		// An empty password is an error too.
		r.mu.Lock()
		r.err, r.password = nil, ""
		r.mu.Unlock()
		if _, err := c.Connect(context.Background()); !errors.As(err, &ce) || !strings.Contains(err.Error(), "empty Password") {
			t.Errorf("empty password: %v", err)
		}
		// While the server is down, a probe whose credentials fail leaves
		// the gate down: it learnt nothing about the server.
		r.set("pw1")
		s.setConnectErr(errRefused)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, err := c.Connect(ctx); err == nil {
			t.Fatal("connect to a down server succeeded")
		}
		r.mu.Lock()
		r.err = vault
		r.mu.Unlock()
		time.Sleep(2 * time.Second) // past the backoff: the next connect probes
		if _, err := c.Connect(context.Background()); !errors.As(err, &ce) {
			t.Fatalf("probe with failing credentials: %v", err)
		}
		if st := c.Stats().Gate.State; st != ServerDown {
			t.Errorf("gate %v after a probe without credentials, want still down", st)
		}
	})
}

// TestCredentialsExpiresCapsMaxAge: a connection made with a token gets a
// max age ending no later than the token, spread by the jitter; a shorter
// resilient_max_age still wins.
func TestCredentialsExpiresCapsMaxAge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &rotatingFunc{password: "pw1", ttl: 10 * time.Minute}
		c, _ := newCredServer(opts(func(o *Options) {
			o.Credentials = r.fn
			o.MaxAgeJitter = JitterPercent(10)
		}), "pw1")
		expires := time.Now().Add(10 * time.Minute)
		var lo, hi time.Time
		for i := range 50 {
			dc, err := c.Connect(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			d := dc.(*conn).life.deadline
			if d.After(expires) || d.Before(expires.Add(-time.Minute)) {
				t.Fatalf("conn %d: deadline %v, want within the last 10%% before the token's expiry %v", i, d, expires)
			}
			if lo.IsZero() || d.Before(lo) {
				lo = d
			}
			if d.After(hi) {
				hi = d
			}
		}
		if hi.Sub(lo) < 10*time.Second {
			t.Errorf("deadlines spread over %v, want the jitter to spread them", hi.Sub(lo))
		}
		// Checked out after the token expired: replaced like any old conn.
		dc, _ := c.Connect(context.Background())
		w := dc.(*conn)
		time.Sleep(10 * time.Minute)
		if err := w.ResetSession(context.Background()); !errors.Is(err, ErrMaxAge) {
			t.Errorf("checkout after the token expired: %v, want ErrMaxAge", err)
		}
		// A max age shorter than the token stays.
		c2, _ := newCredServer(opts(func(o *Options) { o.Credentials = r.fn; o.MaxAge = time.Minute }), "pw1")
		dc, _ = c2.Connect(context.Background())
		if d := dc.(*conn).life.deadline; !d.Equal(time.Now().Add(time.Minute)) {
			t.Errorf("deadline %v, want resilient_max_age's %v", d, time.Now().Add(time.Minute))
		}
	})
}

func TestReuseUntil(t *testing.T) {
	now := time.Unix(1e9, 0)
	for _, tc := range []struct{ ttl, want time.Duration }{
		{15 * time.Minute, 14 * time.Minute}, {time.Hour, 59 * time.Minute},
		{30 * time.Second, 27 * time.Second}, {0, 0}, {-time.Second, -time.Second},
	} {
		if got := reuseUntil(now, now.Add(tc.ttl)).Sub(now); got != tc.want {
			t.Errorf("ttl %v: reused for %v, want %v", tc.ttl, got, tc.want)
		}
	}
}

// TestRevokedRoleMarksBad: with credentials that rotate, a session whose
// role lost its rights (Vault's revocation) is marked bad, so the pool
// replaces it; the error itself reaches the caller once, not retried.
func TestRevokedRoleMarksBad(t *testing.T) {
	for _, tc := range []struct {
		err   error
		creds bool
		bad   bool
	}{
		{&pgconn.PgError{Code: "42501", Message: "permission denied for table t"}, true, true},
		{&pgconn.PgError{Code: "42704", Message: "invalid role OID: 16386"}, true, true},
		{&pgconn.PgError{Code: "42704", Message: `type "nosuch" does not exist`}, true, false},
		{&mysql.MySQLError{Number: 1142, Message: "SELECT command denied"}, true, true},
		{&pgconn.PgError{Code: "42501"}, false, false},
	} {
		o := credOpts(&rotatingFunc{password: "pw1"})
		password := "pw1"
		if !tc.creds {
			o, password = opts(nil), ""
		}
		c, _ := newCredServer(o, password)
		dc, err := c.Connect(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		w := dc.(*conn)
		if got := w.handleErr(context.Background(), tc.err, false); !errors.Is(got, tc.err) || errors.Is(got, driver.ErrBadConn) {
			t.Errorf("%v: handleErr = %v, want the error itself, not retried", tc.err, got)
		}
		if w.bad.Load() != tc.bad || w.IsValid() == tc.bad {
			t.Errorf("%v with credentials %v: bad %v, valid %v; want bad %v", tc.err, tc.creds, w.bad.Load(), w.IsValid(), tc.bad)
		}
	}
}
