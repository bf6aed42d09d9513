package faultlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
)

// mariadbProc is one run of mariadbd, which unlike pg_ctl's postmaster is
// our direct child: we start it, signal it and reap it.
type mariadbProc struct {
	pid  int
	kill func(os.Signal) error
	// done is closed once the process has exited and been reaped; err is
	// its exit status and is only read after done is closed.
	done chan struct{}
	err  error
}

// exited reports whether the process has exited.
func (p *mariadbProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// mariadbReadyTimeout bounds how long a start may take. InnoDB crash
// recovery after StopImmediate is the slow case, still well under this.
const mariadbReadyTimeout = 60 * time.Second

// Start starts mariadbd again on the same port and data directory and
// returns once root can connect over TCP (bounded by ctx and 60 s).
// Starting a running server is a no-op.
func (m *MariaDB) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	return m.startLocked(ctx)
}

// Stop stops the server: StopFast sends SIGTERM and waits for a clean
// shutdown (escalating to SIGKILL after 30 s), StopImmediate sends
// SIGKILL. Either way it returns only after the process has exited.
// Stopping a stopped server is a no-op.
func (m *MariaDB) Stop(mode StopMode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	return m.stopLocked(mode)
}

// Restart stops the server with mode and starts it again.
func (m *MariaDB) Restart(ctx context.Context, mode StopMode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if err := m.stopLocked(mode); err != nil {
		return err
	}
	return m.startLocked(ctx)
}

// Close kills the server and removes Dir. It is idempotent and safe to
// defer or register with t.Cleanup.
func (m *MariaDB) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	stopErr := m.stopLocked(StopImmediate)
	rmErr := os.RemoveAll(m.Dir)
	return errors.Join(stopErr, rmErr)
}

// startLocked launches mariadbd and waits until it accepts connections,
// failing early if the process exits. Caller holds m.mu.
func (m *MariaDB) startLocked(ctx context.Context) error {
	if m.proc != nil && !m.proc.exited() {
		return nil
	}
	// Stdout/stderr catch what mariadbd prints before --log-error is open.
	out, err := os.OpenFile(filepath.Join(m.Dir, "mariadbd.out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("faultlab: open mariadbd.out: %w", err)
	}
	defer out.Close() // the child has its own copy of the descriptor
	// No ctx here: the server must outlive the call that starts it.
	cmd := m.user.command(context.Background(), m.Dir, m.bins.Server, m.serverArgs()...)
	cmd.Stdout, cmd.Stderr = out, out
	dieWithParent(cmd.SysProcAttr)
	start := time.Now()
	proc, err := startLockedThread(cmd, m.ns)
	if err != nil {
		return fmt.Errorf("faultlab: start mariadbd: %w", err)
	}
	m.proc = proc

	err = poll(ctx, 600, 100*time.Millisecond, mariadbReadyTimeout, "wait for mariadbd to accept connections",
		func(ctx context.Context) error {
			if proc.exited() {
				return fmt.Errorf("%w: mariadbd exited: %v", errGiveUp, proc.err)
			}
			return m.ping(ctx)
		})
	if err != nil {
		// Do not leave a half-started server holding the port or datadir.
		m.stopLocked(StopImmediate)
		return withLog(err, m.errLogPath())
	}
	m.logf("faultlab: mariadb on %s ready after %v", m.Addr(), time.Since(start).Round(time.Millisecond))
	return nil
}

// stopLocked signals the server and waits, bounded, for it to exit.
// Caller holds m.mu.
func (m *MariaDB) stopLocked(mode StopMode) error {
	proc := m.proc
	if proc == nil || proc.exited() {
		m.proc = nil
		return nil
	}
	start := time.Now()
	if mode == StopFast {
		if err := proc.kill(syscall.SIGTERM); err == nil && waitDone(proc.done, 30*time.Second) {
			m.proc = nil
			m.logf("faultlab: mariadb on %s stopped (fast) in %v", m.Addr(), time.Since(start).Round(time.Millisecond))
			return nil
		}
		m.logf("faultlab: mariadb on %s ignored SIGTERM, sending SIGKILL", m.Addr())
	}
	proc.kill(syscall.SIGKILL)
	if !waitDone(proc.done, 10*time.Second) {
		return fmt.Errorf("faultlab: mariadbd pid %d did not exit after SIGKILL", proc.pid)
	}
	m.proc = nil
	m.logf("faultlab: mariadb on %s stopped (%s) in %v", m.Addr(), mode, time.Since(start).Round(time.Millisecond))
	return nil
}

// startLockedThread starts cmd from a goroutine locked to its OS thread
// and keeps that goroutine (and thread) until the process exits. The
// parent-death signal fires when the forking *thread* exits, not the
// process; if the Go runtime retired that thread while the server still
// ran, the server would be SIGKILLed mid-test (golang/go#27505).
//
// With ns the thread first enters that namespace, and the server starts
// there; such a thread is never unlocked, so it dies with the goroutine.
func startLockedThread(cmd *exec.Cmd, ns *Netns) (*mariadbProc, error) {
	proc := &mariadbProc{done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if ns == nil {
			defer runtime.UnlockOSThread()
		} else if err := ns.enterThread(); err != nil {
			started <- err
			return
		}
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		proc.pid, proc.kill = cmd.Process.Pid, cmd.Process.Signal
		started <- nil
		proc.err = cmd.Wait()
		close(proc.done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return proc, nil
}

// waitDone waits for done to close, for at most d.
func waitDone(done <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}
