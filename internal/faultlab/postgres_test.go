package faultlab

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// startTestPostgres starts a server for one test and closes it afterwards.
func startTestPostgres(t *testing.T, ctx context.Context, opts PostgresOptions) *Postgres {
	t.Helper()
	requireInstalled(t, func() error { _, err := PostgresBinDir(); return err })
	opts.Logf = t.Logf
	start := time.Now()
	pg, err := StartPostgres(ctx, opts)
	if err != nil {
		t.Fatalf("StartPostgres: %v", err)
	}
	t.Logf("postgres on %s in %s, started in %v", pg.Addr(), pg.Dir, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if err := pg.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return pg
}

// pgConnect opens a client connection, closed at cleanup.
func pgConnect(t *testing.T, ctx context.Context, dsn string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// pgSelect1 runs SELECT 1 and returns the error.
func pgSelect1(ctx context.Context, c *pgx.Conn) error {
	var one int
	if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		return err
	}
	if one != 1 {
		return errors.New("SELECT 1 returned something else")
	}
	return nil
}

// sqlState returns err's SQLSTATE, or "".
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

func TestPostgresLifecycleAndFaults(t *testing.T) {
	ctx := testCtx(t, 50*time.Second)
	pg := startTestPostgres(t, ctx, PostgresOptions{ExtraConf: map[string]string{"statement_timeout": "7s"}})
	if want := "postgres://postgres@127.0.0.1:"; !strings.HasPrefix(pg.DSN("test"), want) {
		t.Fatalf("DSN = %q", pg.DSN("test"))
	}
	c := pgConnect(t, ctx, pg.DSN("test"))
	if err := pgSelect1(ctx, c); err != nil {
		t.Fatal(err)
	}
	var st string
	if err := c.QueryRow(ctx, "SHOW statement_timeout").Scan(&st); err != nil || st != "7s" {
		t.Fatalf("ExtraConf statement_timeout = %q, %v; want 7s", st, err)
	}

	t.Run("KillSessions", func(t *testing.T) {
		victim := pgConnect(t, ctx, pg.DSN("test"))
		if err := pgSelect1(ctx, victim); err != nil {
			t.Fatal(err)
		}
		n, err := pg.KillSessions(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n < 2 { // victim and c
			t.Fatalf("KillSessions = %d, want >= 2", n)
		}
		err = pgSelect1(ctx, victim)
		if err == nil {
			t.Fatal("query on a killed session succeeded")
		}
		t.Logf("killed idle pgx session reports: %v (SQLSTATE %q)", err, sqlState(err))
		if !victim.IsClosed() {
			t.Error("pgx did not mark the killed connection closed")
		}
		if err := pgSelect1(ctx, pgConnect(t, ctx, pg.DSN("test"))); err != nil {
			t.Fatalf("new connection after KillSessions: %v", err)
		}
	})

	t.Run("SetReadOnlyReachesOpenSessions", func(t *testing.T) {
		open := pgConnect(t, ctx, pg.DSN("test"))
		if _, err := open.Exec(ctx, "CREATE TABLE rw_before (x int)"); err != nil {
			t.Fatal(err)
		}
		// Documented exceptions: a transaction already in progress, and a
		// session that set the parameter itself.
		inTx, err := pgConnect(t, ctx, pg.DSN("test")).Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer inTx.Rollback(ctx)
		if _, err := inTx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		pinned := pgConnect(t, ctx, pg.DSN("test"))
		if _, err := pinned.Exec(ctx, "SET default_transaction_read_only = off"); err != nil {
			t.Fatal(err)
		}

		if err := pg.SetReadOnly(ctx, true); err != nil {
			t.Fatal(err)
		}
		if _, err := inTx.Exec(ctx, "CREATE TABLE rw_in_tx (x int)"); err != nil {
			t.Fatalf("transaction begun before SetReadOnly could not write: %v", err)
		}
		if _, err := pinned.Exec(ctx, "CREATE TABLE rw_pinned (x int)"); err != nil {
			t.Fatalf("session with its own SET could not write: %v", err)
		}
		// The session opened before the switch, idle since, must obey it
		// on its very next statement: this is the documented claim.
		_, err = open.Exec(ctx, "CREATE TABLE rw_during (x int)")
		if got := sqlState(err); got != "25006" {
			t.Fatalf("write on pre-existing session after SetReadOnly(true): %v (SQLSTATE %q), want 25006", err, got)
		}
		fresh := pgConnect(t, ctx, pg.DSN("test"))
		if _, err := fresh.Exec(ctx, "INSERT INTO rw_before VALUES (1)"); sqlState(err) != "25006" {
			t.Fatalf("write on new session: %v, want 25006", err)
		}
		if err := pgSelect1(ctx, fresh); err != nil {
			t.Fatalf("reads must still work: %v", err)
		}
		if err := pg.SetReadOnly(ctx, false); err != nil {
			t.Fatal(err)
		}
		if _, err := open.Exec(ctx, "INSERT INTO rw_before VALUES (2)"); err != nil {
			t.Fatalf("write after SetReadOnly(false) on the same session: %v", err)
		}
	})

	t.Run("RestartKeepsPortAndData", func(t *testing.T) {
		c := pgConnect(t, ctx, pg.DSN("test"))
		if _, err := c.Exec(ctx, "CREATE TABLE survives (x int); INSERT INTO survives VALUES (42)"); err != nil {
			t.Fatal(err)
		}
		port := pg.Port
		for _, mode := range []StopMode{StopFast, StopImmediate} {
			if err := pg.Restart(ctx, mode); err != nil {
				t.Fatalf("Restart(%v): %v", mode, err)
			}
			if pg.Port != port {
				t.Fatalf("port changed from %d to %d", port, pg.Port)
			}
			if err := pgSelect1(ctx, c); err == nil {
				t.Fatalf("old connection survived Restart(%v)", mode)
			} else {
				t.Logf("old pgx conn after Restart(%v): %v", mode, err)
			}
			c = pgConnect(t, ctx, pg.DSN("test"))
			var x int
			// The row was committed before the fast restart's checkpoint,
			// so it survives both restarts.
			if err := c.QueryRow(ctx, "SELECT x FROM survives").Scan(&x); err != nil || x != 42 {
				t.Fatalf("after Restart(%v): x = %d, %v", mode, x, err)
			}
		}
	})

	t.Run("StopThenStart", func(t *testing.T) {
		if err := pg.Stop(StopFast); err != nil {
			t.Fatal(err)
		}
		if err := pg.Stop(StopFast); err != nil {
			t.Fatalf("second Stop: %v", err)
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if c, err := pgx.Connect(cctx, pg.DSN("test")); err == nil {
			c.Close(ctx)
			t.Fatal("connected to a stopped server")
		}
		if err := pg.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := pg.Start(ctx); err != nil {
			t.Fatalf("Start on a running server: %v", err)
		}
		if err := pgSelect1(ctx, pgConnect(t, ctx, pg.DSN("test"))); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ThroughProxy", func(t *testing.T) {
		p := newProxy(t, pg.Addr())
		dsn := strings.Replace(pg.DSN("test"), pg.Addr(), p.Addr(), 1)
		c := pgConnect(t, ctx, dsn)
		if err := pgSelect1(ctx, c); err != nil {
			t.Fatal(err)
		}
		p.BlackholeAll()
		qctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := pgSelect1(qctx, c); err == nil {
			t.Fatal("query through a black hole succeeded")
		} else {
			t.Logf("pgx query through black hole: %v after %v", err, time.Since(start).Round(time.Millisecond))
		}
		if err := pgSelect1(ctx, pgConnect(t, ctx, dsn)); err != nil {
			t.Fatalf("new conn through proxy: %v", err)
		}
	})

	t.Run("Close", func(t *testing.T) {
		if err := pg.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(pg.Dir); !os.IsNotExist(err) {
			t.Fatalf("Dir still there after Close: %v", err)
		}
		if err := pg.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if err := pg.Start(ctx); !errors.Is(err, ErrClosed) {
			t.Fatalf("Start after Close = %v, want ErrClosed", err)
		}
	})
}

func TestPostgresStartFailureShowsLog(t *testing.T) {
	ctx := testCtx(t, 40*time.Second)
	requireInstalled(t, func() error { _, err := PostgresBinDir(); return err })
	pg, err := StartPostgres(ctx, PostgresOptions{
		Logf:      t.Logf,
		ExtraConf: map[string]string{"shared_buffers": "not-a-size"},
	})
	if err == nil {
		pg.Close()
		t.Fatal("StartPostgres with a broken setting succeeded")
	}
	if !strings.Contains(err.Error(), "shared_buffers") || !strings.Contains(err.Error(), "tail of") {
		t.Fatalf("error does not include the server log: %v", err)
	}
	t.Logf("start failure (as expected): %v", err)
}
