package faultlab

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// startTestMariaDB starts a server for one test and closes it afterwards.
func startTestMariaDB(t *testing.T, ctx context.Context) *MariaDB {
	t.Helper()
	requireInstalled(t, func() error { _, err := MariaDBBinaries(); return err })
	start := time.Now()
	m, err := StartMariaDB(ctx, MariaDBOptions{Logf: t.Logf})
	if err != nil {
		t.Fatalf("StartMariaDB: %v", err)
	}
	t.Logf("mariadb on %s in %s, started in %v", m.Addr(), m.Dir, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return m
}

// myOpen opens a client pool for dsn with short network timeouts, closed
// at cleanup.
func myOpen(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Timeout = 2 * time.Second
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(connector)
	t.Cleanup(func() { db.Close() })
	return db
}

// myPinned returns one connection taken out of db's pool, so a test can
// hold the very session it expects to be killed.
func myPinned(t *testing.T, ctx context.Context, db *sql.DB) *sql.Conn {
	t.Helper()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// mySelect1 runs SELECT 1 on q (a *sql.DB or *sql.Conn).
func mySelect1(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) error {
	var one int
	return q.QueryRowContext(ctx, "SELECT 1").Scan(&one)
}

// myErrNumber returns err's MariaDB error number, or 0.
func myErrNumber(err error) uint16 {
	var myErr *mysql.MySQLError
	if errors.As(err, &myErr) {
		return myErr.Number
	}
	return 0
}

func TestMariaDBLifecycleAndFaults(t *testing.T) {
	ctx := testCtx(t, 50*time.Second)
	m := startTestMariaDB(t, ctx)
	if want := "root@tcp(127.0.0.1:"; !strings.HasPrefix(m.DSN("test"), want) || !strings.HasSuffix(m.DSN("test"), ")/test") {
		t.Fatalf("DSN = %q", m.DSN("test"))
	}
	db := myOpen(t, m.DSN("test"))
	if err := mySelect1(ctx, db); err != nil {
		t.Fatal(err)
	}

	t.Run("KillSessions", func(t *testing.T) {
		victim := myPinned(t, ctx, db)
		if err := mySelect1(ctx, victim); err != nil {
			t.Fatal(err)
		}
		n, err := m.KillSessions(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n < 1 {
			t.Fatalf("KillSessions = %d, want >= 1", n)
		}
		err = mySelect1(ctx, victim)
		if err == nil {
			t.Fatal("query on a killed session succeeded")
		}
		// MariaDB sends no error packet to an idle session it kills, it
		// just closes the socket: the driver sees EOF.
		t.Logf("killed idle session reports: %v", err)
		// A pool, unlike a pinned conn, hides the kill: the driver's
		// liveness check drops the dead idle conn and dials a new one.
		if err := mySelect1(ctx, db); err != nil {
			t.Fatalf("pool after KillSessions: %v", err)
		}
	})

	t.Run("SetReadOnlyStopsRoot", func(t *testing.T) {
		if _, err := db.ExecContext(ctx, "CREATE TABLE ro (x int)"); err != nil {
			t.Fatal(err)
		}
		open := myPinned(t, ctx, db)
		if err := mySelect1(ctx, open); err != nil {
			t.Fatal(err)
		}
		if err := m.SetReadOnly(ctx, true); err != nil {
			t.Fatal(err)
		}
		_, err := open.ExecContext(ctx, "INSERT INTO ro VALUES (1)")
		if got := myErrNumber(err); got != 1290 {
			t.Fatalf("write by root on an open session under read_only: %v, want error 1290", err)
		}
		fresh := myOpen(t, m.DSN("test"))
		if _, err := fresh.ExecContext(ctx, "INSERT INTO ro VALUES (1)"); myErrNumber(err) != 1290 {
			t.Fatalf("write by root on a new session: %v, want error 1290", err)
		}
		if err := mySelect1(ctx, fresh); err != nil {
			t.Fatalf("reads must still work: %v", err)
		}
		if err := m.SetReadOnly(ctx, false); err != nil {
			t.Fatal(err)
		}
		if _, err := open.ExecContext(ctx, "INSERT INTO ro VALUES (2)"); err != nil {
			t.Fatalf("write after SetReadOnly(false): %v", err)
		}
	})

	t.Run("SetReadOnlyWithOpenWriteTx", func(t *testing.T) {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, "INSERT INTO ro VALUES (3)"); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		err = m.SetReadOnly(ctx, true)
		t.Logf("SetReadOnly(true) with an uncommitted write open: %v after %v", err, time.Since(start).Round(time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		err = tx.Commit()
		t.Logf("commit of that transaction under read_only: %v", err)
		if myErrNumber(err) != 1290 {
			t.Fatalf("commit = %v, want error 1290", err)
		}
		if err := m.SetReadOnly(ctx, false); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("RestartKeepsPortAndData", func(t *testing.T) {
		if _, err := db.ExecContext(ctx, "CREATE TABLE survives (x int); "); err != nil {
			t.Fatal(err)
		}
		if _, err := db.ExecContext(ctx, "INSERT INTO survives VALUES (42)"); err != nil {
			t.Fatal(err)
		}
		port := m.Port
		for _, mode := range []StopMode{StopFast, StopImmediate} {
			old := myPinned(t, ctx, db)
			if err := m.Restart(ctx, mode); err != nil {
				t.Fatalf("Restart(%v): %v", mode, err)
			}
			if m.Port != port {
				t.Fatalf("port changed from %d to %d", port, m.Port)
			}
			if err := mySelect1(ctx, old); err == nil {
				t.Fatalf("old session survived Restart(%v)", mode)
			} else {
				t.Logf("old session after Restart(%v): %v", mode, err)
			}
			old.Close()
			var x int
			// Committed before the clean shutdown of the fast restart,
			// so both restarts keep it.
			if err := db.QueryRowContext(ctx, "SELECT x FROM survives").Scan(&x); err != nil || x != 42 {
				t.Fatalf("after Restart(%v): x = %d, %v", mode, x, err)
			}
		}
	})

	t.Run("StopThenStart", func(t *testing.T) {
		if err := m.Stop(StopFast); err != nil {
			t.Fatal(err)
		}
		if err := m.Stop(StopImmediate); err != nil {
			t.Fatalf("second Stop: %v", err)
		}
		if err := mySelect1(ctx, myOpen(t, m.DSN("test"))); err == nil {
			t.Fatal("query on a stopped server succeeded")
		}
		if err := m.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := m.Start(ctx); err != nil {
			t.Fatalf("Start on a running server: %v", err)
		}
		if err := mySelect1(ctx, myOpen(t, m.DSN("test"))); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ThroughProxy", func(t *testing.T) {
		p := newProxy(t, m.Addr())
		pdb := myOpen(t, strings.Replace(m.DSN("test"), m.Addr(), p.Addr(), 1))
		c := myPinned(t, ctx, pdb)
		if err := mySelect1(ctx, c); err != nil {
			t.Fatal(err)
		}
		if n := p.ResetAll(); n != 1 {
			t.Fatalf("ResetAll = %d, want 1", n)
		}
		if err := mySelect1(ctx, c); err == nil {
			t.Fatal("query on a reset connection succeeded")
		} else {
			t.Logf("mysql session after proxy reset: %v", err)
		}
		if err := mySelect1(ctx, pdb); err != nil {
			t.Fatalf("pool through proxy after reset: %v", err)
		}
	})

	t.Run("Close", func(t *testing.T) {
		if err := m.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(m.Dir); !os.IsNotExist(err) {
			t.Fatalf("Dir still there after Close: %v", err)
		}
		if err := m.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if err := m.Start(ctx); !errors.Is(err, ErrClosed) {
			t.Fatalf("Start after Close = %v, want ErrClosed", err)
		}
	})
}

func TestMariaDBStartFailureShowsLog(t *testing.T) {
	ctx := testCtx(t, 40*time.Second)
	requireInstalled(t, func() error { _, err := MariaDBBinaries(); return err })
	start := time.Now()
	m, err := StartMariaDB(ctx, MariaDBOptions{Logf: t.Logf, ExtraArgs: []string{"--no-such-option-faultlab"}})
	if err == nil {
		m.Close()
		t.Fatal("StartMariaDB with a bad option succeeded")
	}
	if !strings.Contains(err.Error(), "no-such-option-faultlab") || !strings.Contains(err.Error(), "tail of") {
		t.Fatalf("error does not include the error log: %v", err)
	}
	// An exited server must be noticed at once, not after the ready timeout.
	if el := time.Since(start); el > 15*time.Second {
		t.Fatalf("failure took %v to report", el)
	}
	t.Logf("start failure (as expected) after %v: %v", time.Since(start).Round(time.Millisecond), err)
}
