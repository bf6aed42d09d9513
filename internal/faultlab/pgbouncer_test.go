package faultlab

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// startTestPgBouncer starts PostgreSQL and a PgBouncer in front of it.
func startTestPgBouncer(t *testing.T, ctx context.Context, opts PgBouncerOptions) (*Postgres, *PgBouncer) {
	t.Helper()
	requireInstalled(t, func() error { _, err := helperBinary("pgbouncer", "pgbouncer"); return err })
	pg := startTestPostgres(t, ctx, PostgresOptions{})
	opts.Target, opts.Logf = pg.Addr(), t.Logf
	b, err := StartPgBouncer(ctx, opts)
	if err != nil {
		t.Fatalf("StartPgBouncer: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return pg, b
}

// TestPgBouncerAdminAndRestart checks the admin console (SHOW, SET, PAUSE,
// RESUME, KILL, SHUTDOWN) and a SIGTERM restart on the same port, in
// transaction mode.
func TestPgBouncerAdminAndRestart(t *testing.T) {
	ctx := testCtx(t, time.Minute)
	_, b := startTestPgBouncer(t, ctx, PgBouncerOptions{PoolMode: "transaction"})
	c := pgConnect(t, ctx, b.DSN("test")+"&default_query_exec_mode=exec")
	if err := pgSelect1(ctx, c); err != nil {
		t.Fatalf("query through pgbouncer: %v", err)
	}
	if err := b.Set(ctx, "server_login_retry", "1"); err != nil {
		t.Fatal(err)
	}
	cfg, err := b.Show(ctx, "CONFIG")
	if err != nil {
		t.Fatal(err)
	}
	for _, row := range cfg {
		if row["key"] == "server_login_retry" && row["value"] != "1" {
			t.Errorf("server_login_retry = %q after SET, want 1", row["value"])
		}
	}

	// PAUSE holds queries until RESUME.
	if err := b.Admin(ctx, "PAUSE"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- pgSelect1(ctx, c) }()
	select {
	case err := <-done:
		t.Fatalf("query finished during PAUSE: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := b.Admin(ctx, "RESUME"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("query held by PAUSE: %v", err)
	}
	if err := b.Admin(ctx, "RECONNECT"); err != nil {
		t.Fatal(err)
	}

	// KILL drops the database's clients with 08P01 "database removed".
	if err := b.Admin(ctx, "KILL test"); err != nil {
		t.Fatal(err)
	}
	err = pgSelect1(ctx, c)
	if sqlState(err) != "08P01" && !errors.Is(err, pgconn.ErrConnClosed) {
		t.Logf("query after KILL: %v (SQLSTATE %q)", err, sqlState(err))
	}
	if err := b.Admin(ctx, "RESUME test"); err != nil {
		t.Fatal(err)
	}

	// SIGTERM, then start again on the same port.
	pid := b.Pid()
	if err := b.Restart(ctx, StopFast); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	if b.Pid() == pid || b.Pid() == 0 {
		t.Fatalf("pid %d after restart, was %d", b.Pid(), pid)
	}
	c2 := pgConnect(t, ctx, b.DSN("test")+"&default_query_exec_mode=exec")
	if err := pgSelect1(ctx, c2); err != nil {
		t.Fatalf("query after restart: %v", err)
	}

	// SHUTDOWN on the console ends the process.
	if err := b.Admin(ctx, "SHUTDOWN"); err != nil {
		t.Fatal(err)
	}
	if err := b.WaitExit(5 * time.Second); err != nil || b.Running() {
		t.Fatalf("after SHUTDOWN: running %v, %v", b.Running(), err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatalf("Start after SHUTDOWN: %v", err)
	}
}

// TestPgBouncerMD5 checks auth_type md5 against the auth file: the right
// password logs in (PgBouncer then logs in to PostgreSQL, which trusts
// it), a wrong one is refused by PgBouncer itself.
func TestPgBouncerMD5(t *testing.T) {
	ctx := testCtx(t, time.Minute)
	pg, b := startTestPgBouncer(t, ctx, PgBouncerOptions{AuthType: "md5", Users: map[string]string{"app": "s3cret \"x\""}})
	if err := pg.Exec(ctx, "CREATE ROLE app LOGIN"); err != nil {
		t.Fatal(err)
	}
	cfg, err := pgx.ParseConfig(b.DSN("test"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.User, cfg.Password = "app", `s3cret "x"`
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("md5 login with the right password: %v", err)
	}
	defer c.Close(ctx)
	if err := pgSelect1(ctx, c); err != nil {
		t.Fatal(err)
	}
	cfg.Password = "wrong"
	if c2, err := pgx.ConnectConfig(ctx, cfg); err == nil {
		c2.Close(ctx)
		t.Fatal("md5 login with a wrong password succeeded")
	} else {
		t.Logf("wrong password: %v (SQLSTATE %q)", err, sqlState(err))
	}
}

// TestPgBouncerExecModes records which pgx query modes work under
// transaction pooling on this PgBouncer (1.18 has no prepared-statement
// support): the default cache_statement must fail once statements from
// two clients share a server connection; cache_describe, exec and
// simple_protocol must work, and so must pgx's ping ("-- ping").
func TestPgBouncerExecModes(t *testing.T) {
	ctx := testCtx(t, time.Minute)
	_, b := startTestPgBouncer(t, ctx, PgBouncerOptions{PoolMode: "transaction",
		Settings: map[string]string{"default_pool_size": "1"}}) // one server connection: every client shares it
	for _, mode := range []string{"cache_statement", "cache_describe", "exec", "simple_protocol"} {
		var firstErr error
		conns := []*pgx.Conn{}
		for range 2 {
			conns = append(conns, pgConnect(t, ctx, b.DSN("test")+"&default_query_exec_mode="+mode))
		}
		for i := range 20 {
			c := conns[i%2]
			var n int
			err := c.QueryRow(ctx, "SELECT $1::int + 1", i).Scan(&n)
			if err == nil {
				err = c.Ping(ctx)
			}
			if err != nil && firstErr == nil {
				firstErr = err
			}
		}
		t.Logf("default_query_exec_mode=%s under transaction pooling: first error %v (SQLSTATE %q)", mode, firstErr, sqlState(firstErr))
		if mode == "cache_statement" && firstErr == nil {
			t.Errorf("cache_statement worked under transaction pooling; the README's warning would be wrong")
		}
		if mode != "cache_statement" && firstErr != nil {
			t.Errorf("%s failed under transaction pooling: %v", mode, firstErr)
		}
	}
}
