package faultlab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// daemon is a long-running helper program (pgbouncer, etcd, haproxy,
// patroni) that runs in the foreground as our direct child, so that we can
// signal and reap it, and that the kernel kills if this process dies first
// (dieWithParent). Its stdout and stderr go to out. Safe for concurrent use.
type daemon struct {
	name string // for messages
	user serverUser
	dir  string // working directory
	out  string // file receiving stdout and stderr
	env  []string
	path string
	args []string
	logf func(string, ...any)

	mu   sync.Mutex
	proc *mariadbProc // the running process, or nil
}

// newDaemon prepares what every helper program needs before it starts: its
// binary (from Debian package pkg), the OS user it runs as, stale labs
// swept, and a fresh lab directory with its log file logName in it.
func newDaemon(name, pkg, logName string, logf func(string, ...any)) (*daemon, error) {
	bin, err := helperBinary(name, pkg)
	if err != nil {
		return nil, err
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	u, err := lookupServerUser("postgres")
	if err != nil {
		return nil, err
	}
	sweepStale(logf)
	dir, err := newLabDir(name, u)
	if err != nil {
		return nil, err
	}
	return &daemon{name: name, user: u, dir: dir, out: filepath.Join(dir, logName), path: bin, logf: logf}, nil
}

// start launches the program unless it is already running.
func (d *daemon) start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc != nil && !d.proc.exited() {
		return nil
	}
	out, err := os.OpenFile(d.out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("faultlab: open %s: %w", d.out, err)
	}
	defer out.Close() // the child has its own copy
	// No ctx: the program must outlive the call that starts it.
	cmd := d.user.command(context.Background(), d.dir, d.path, d.args...)
	cmd.Env = append(cmd.Env, d.env...)
	cmd.Stdout, cmd.Stderr = out, out
	// A process group of its own, so that a signal meant for it never
	// reaches the test binary's group, and a whole tree can be killed.
	cmd.SysProcAttr.Setpgid = true
	dieWithParent(cmd.SysProcAttr)
	proc, err := startLockedThread(cmd, nil)
	if err != nil {
		return fmt.Errorf("faultlab: start %s: %w", d.name, err)
	}
	d.proc = proc
	return nil
}

// current returns the running process, or nil.
func (d *daemon) current() *mariadbProc {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.proc == nil || d.proc.exited() {
		return nil
	}
	return d.proc
}

// exitedErr is errGiveUp if the process is not running: a readiness poll
// returns it so that a program that died is not waited for.
func (d *daemon) exitedErr() error {
	if d.current() == nil {
		return fmt.Errorf("%w: %s is not running (see %s)", errGiveUp, d.name, d.out)
	}
	return nil
}

// diedErr is like exitedErr, but a daemon never started counts as fine.
func (d *daemon) diedErr() error {
	d.mu.Lock()
	p := d.proc
	d.mu.Unlock()
	if p != nil && p.exited() {
		return fmt.Errorf("%w: %s exited: %v (see %s)", errGiveUp, d.name, p.err, d.out)
	}
	return nil
}

// pid returns the running process's pid, or 0.
func (d *daemon) pid() int {
	if p := d.current(); p != nil {
		return p.pid
	}
	return 0
}

// stop sends sig, waits up to grace for the exit, then SIGKILLs the whole
// process group and waits up to 10 s more. Stopping a stopped daemon is a
// no-op.
func (d *daemon) stop(sig syscall.Signal, grace time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.proc
	if p == nil || p.exited() {
		d.proc = nil
		return nil
	}
	start := time.Now()
	if sig != syscall.SIGKILL {
		if err := p.kill(sig); err == nil && waitDone(p.done, grace) {
			d.proc = nil
			d.logf("faultlab: %s stopped (%v) in %v", d.name, sig, time.Since(start).Round(time.Millisecond))
			return nil
		}
	}
	syscall.Kill(-p.pid, syscall.SIGKILL) // its group: it may have children
	p.kill(syscall.SIGKILL)
	if !waitDone(p.done, 10*time.Second) {
		return fmt.Errorf("faultlab: %s pid %d did not exit after SIGKILL", d.name, p.pid)
	}
	d.proc = nil
	d.logf("faultlab: %s killed in %v", d.name, time.Since(start).Round(time.Millisecond))
	return nil
}

// helperBinary finds one of the HA helper programs, or wraps
// ErrNotInstalled with the Debian package that provides it.
func helperBinary(name, pkg string) (string, error) {
	if p := findProgram(name, "/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"); p != "" {
		return p, nil
	}
	return "", fmt.Errorf("%w: %s not found (Debian package %s)", ErrNotInstalled, name, pkg)
}
