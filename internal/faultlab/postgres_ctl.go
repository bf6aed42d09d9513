package faultlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgCtlTimeout bounds one pg_ctl start or stop; it matches the "-t 30"
// passed to pg_ctl, plus slack for pg_ctl itself.
const pgCtlTimeout = 45 * time.Second

// Start starts the server again on the same port and data directory and
// returns once it accepts TCP connections (bounded by ctx and ~75 s).
// Starting a running server is a no-op.
func (p *Postgres) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	return p.startLocked(ctx)
}

// Stop stops the server (see StopMode). Existing client connections break;
// the port refuses connections until Start. Stopping a stopped server is a
// no-op.
func (p *Postgres) Stop(mode StopMode) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	return p.stopLocked(mode)
}

// Restart stops the server with mode and starts it again, like a failover
// to the same address or a crash and recovery for StopImmediate.
func (p *Postgres) Restart(ctx context.Context, mode StopMode) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	if err := p.stopLocked(mode); err != nil {
		return err
	}
	return p.startLocked(ctx)
}

// Close stops the server immediately and removes Dir. It is idempotent and
// safe to defer or register with t.Cleanup.
func (p *Postgres) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	// Remove the directory even if the stop failed: a postmaster whose
	// lock file disappears shuts itself down at its next periodic check,
	// which beats leaving it running forever.
	stopErr := p.stopLocked(StopImmediate)
	rmErr := os.RemoveAll(p.Dir)
	return errors.Join(stopErr, rmErr)
}

// startLocked runs "pg_ctl start -w" and then waits until a real TCP
// client can connect; pg_ctl's notion of ready does not prove the TCP
// listener is usable from here. Caller holds p.mu.
func (p *Postgres) startLocked(ctx context.Context) error {
	if p.running() {
		return nil
	}
	ctx, cancel := withDeadline(ctx, pgCtlTimeout+30*time.Second)
	defer cancel()
	start := time.Now()
	var out []byte
	err := p.inNetns(func() (err error) {
		out, err = p.pgCtl(ctx, "-l", p.logPath(), "-w", "-t", "30", "start")
		return err
	})
	if err != nil {
		return withLog(fmt.Errorf("faultlab: pg_ctl start on port %d: %w\n%s", p.Port, err, out), p.logPath())
	}
	err = poll(ctx, 150, 100*time.Millisecond, 30*time.Second, "wait for postgres to accept connections",
		func(ctx context.Context) error {
			conn, err := p.connect(ctx, "postgres")
			if err != nil {
				return err
			}
			return conn.Close(ctx)
		})
	if err != nil {
		return withLog(err, p.logPath())
	}
	p.logf("faultlab: postgres on %s ready after %v", p.Addr(), time.Since(start).Round(time.Millisecond))
	return nil
}

// stopLocked runs "pg_ctl stop" with the mode's -m flag. Caller holds p.mu.
func (p *Postgres) stopLocked(mode StopMode) error {
	if !p.running() {
		return nil
	}
	m := "fast"
	if mode == StopImmediate {
		m = "immediate"
	}
	ctx, cancel := context.WithTimeout(context.Background(), pgCtlTimeout)
	defer cancel()
	start := time.Now()
	if out, err := p.pgCtl(ctx, "-m", m, "-w", "-t", "30", "stop"); err != nil {
		return withLog(fmt.Errorf("faultlab: pg_ctl stop -m %s: %w\n%s", m, err, out), p.logPath())
	}
	p.logf("faultlab: postgres on %s stopped (%s) in %v", p.Addr(), m, time.Since(start).Round(time.Millisecond))
	return nil
}

// running asks "pg_ctl status", which checks both the lock file and that
// its pid is alive, so a postmaster killed behind our back counts as
// stopped. Exit status 3 means "not running"; anything else that is not
// success (say, a missing data directory) is treated as not running too,
// and the following start or stop reports the real problem.
func (p *Postgres) running() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := p.pgCtl(ctx, "status")
	return err == nil
}

// pgCtl runs pg_ctl against the data directory as the server user.
func (p *Postgres) pgCtl(ctx context.Context, args ...string) ([]byte, error) {
	args = append([]string{"-D", p.dataDir()}, args...)
	cmd := p.user.command(ctx, p.Dir, filepath.Join(p.bin, "pg_ctl"), args...)
	// pg_ctl's daemonised postmaster writes to the -l file, not to these
	// pipes, so waiting for them cannot hang; WaitDelay guards anyway.
	cmd.WaitDelay = 5 * time.Second
	return cmd.CombinedOutput()
}

// inNetns runs f (which starts the postmaster through pg_ctl) inside the
// server's namespace, if it has one: the postmaster inherits it.
func (p *Postgres) inNetns(f func() error) error {
	if p.ns == nil {
		return f()
	}
	return p.ns.inside(f)
}

// connect opens an admin connection to db, over the unix socket inside a
// namespace (no injected network fault may stall admin work).
// application_name marks it in pg_stat_activity so that it is easy to spot
// while debugging.
func (p *Postgres) connect(ctx context.Context, db string) (*pgx.Conn, error) {
	if p.ns != nil {
		return pgx.Connect(ctx, p.SocketDSN(db)+" connect_timeout=5 application_name=faultlab-admin")
	}
	return pgx.Connect(ctx, p.DSN(db)+"&connect_timeout=5&application_name=faultlab-admin")
}
