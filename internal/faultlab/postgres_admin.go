package faultlab

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Exec runs sql on a fresh superuser connection to the "postgres"
// database, e.g. "ALTER SYSTEM SET ..." followed by a separate
// Exec("SELECT pg_reload_conf()"). Several statements in one call run as
// one implicit transaction, which ALTER SYSTEM and CREATE DATABASE refuse,
// so send those alone. Without a ctx deadline it is bounded to 30 s.
func (p *Postgres) Exec(ctx context.Context, sql string) error {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	conn, err := p.connect(ctx, "postgres")
	if err != nil {
		return fmt.Errorf("faultlab: admin connect: %w", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, sql); err != nil {
		return fmt.Errorf("faultlab: exec %q: %w", sql, err)
	}
	return nil
}

// KillSessions terminates every client backend (in every database) except
// the admin connection it uses itself, and returns how many it terminated.
// It waits up to 5 s per backend for each to exit, so when it returns the
// sessions are really gone: an idle client notices on its next use, when
// it reads the FATAL 57P01 "terminating connection due to administrator
// command" the backend sent before closing the socket.
func (p *Postgres) KillSessions(ctx context.Context) (int, error) {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	conn, err := p.connect(ctx, "postgres")
	if err != nil {
		return 0, fmt.Errorf("faultlab: admin connect: %w", err)
	}
	defer conn.Close(context.Background())
	// The two-argument form (PostgreSQL 14+) waits for the backend to exit.
	const q = `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
		FROM pg_stat_activity
		WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()`
	var n int
	if err := conn.QueryRow(ctx, q).Scan(&n); err != nil {
		return 0, fmt.Errorf("faultlab: terminate backends: %w", err)
	}
	return n, nil
}

// SetReadOnly turns default_transaction_read_only on or off cluster-wide
// via ALTER SYSTEM and a configuration reload, then waits until a new
// session sees the new value. Writes then fail with SQLSTATE 25006
// (read_only_sql_transaction), much like on a hot standby.
//
// It also reaches sessions that are already open, verified by the tests:
// a backend applies a pending reload after reading its next command and
// before running it, so an idle session's very next statement obeys the
// new setting. Not affected are a transaction already in progress (its
// mode was fixed at BEGIN), a session that ran SET
// default_transaction_read_only itself (a session value beats the config
// file), and anything that explicitly asks for BEGIN READ WRITE. To force
// clients onto the new setting regardless, follow with KillSessions. The
// setting lives in postgresql.auto.conf, so it survives restarts until
// SetReadOnly(false).
func (p *Postgres) SetReadOnly(ctx context.Context, on bool) error {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	want := "off"
	if on {
		want = "on"
	}
	if err := p.Exec(ctx, "ALTER SYSTEM SET default_transaction_read_only = "+want); err != nil {
		return err
	}
	if err := p.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	// pg_reload_conf only signals the postmaster; a new backend seeing the
	// value proves the postmaster reloaded and has signalled the others.
	return poll(ctx, 100, 20*time.Millisecond, 10*time.Second, "wait for default_transaction_read_only="+want,
		func(ctx context.Context) error {
			conn, err := p.connect(ctx, "postgres")
			if err != nil {
				return err
			}
			defer conn.Close(context.Background())
			var got string
			if err := conn.QueryRow(ctx, "SHOW default_transaction_read_only").Scan(&got); err != nil {
				return err
			}
			if got != want {
				return errors.New("still " + got)
			}
			return nil
		})
}
