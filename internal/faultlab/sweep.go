package faultlab

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// sweepOnce makes the stale sweep run at most once per process: one pass
// is enough to clean what earlier, crashed runs left behind.
var sweepOnce sync.Once

// sweepStale removes lab directories whose creating process is gone, after
// stopping any server still running from them. A test binary killed by a
// timeout never runs its cleanups, and pg_ctl detaches PostgreSQL from us,
// so without this every crashed run would leak a server and a directory.
// Directories whose owner is still alive (a concurrent test binary) or
// whose owner is unknown are left alone.
func sweepStale(logf func(string, ...any)) {
	sweepOnce.Do(func() {
		dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), labDirPrefix+"*"))
		for _, dir := range dirs {
			if err := sweepDir(dir); err != nil {
				logf("faultlab: sweep %s: %v", dir, err)
			}
		}
	})
}

// sweepDir cleans one directory if its owner is dead.
func sweepDir(dir string) error {
	raw, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		return nil // not ours, or still being created
	}
	owner, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || owner <= 0 || processAlive(owner) {
		return nil
	}
	// PostgreSQL gets SIGQUIT (what "pg_ctl -m immediate" sends) so it
	// releases its shared memory; MariaDB simply gets SIGKILL.
	pidFiles := map[string]syscall.Signal{
		filepath.Join(dir, "data", "postmaster.pid"): syscall.SIGQUIT,
		filepath.Join(dir, mariadbPidFile):           syscall.SIGKILL,
	}
	for pidFile, sig := range pidFiles {
		if err := stopStaleServer(dir, pidFile, sig); err != nil {
			return err // keep the directory: its server may still need it
		}
	}
	return os.RemoveAll(dir)
}

// stopStaleServer signals the server recorded in pidFile, but only if that
// pid still runs a command mentioning dir: after a reboot or pid reuse the
// number may belong to an unrelated process, which must not be touched.
func stopStaleServer(dir, pidFile string, sig syscall.Signal) error {
	raw, err := os.ReadFile(pidFile)
	if err != nil {
		return nil
	}
	first, _, _ := strings.Cut(string(raw), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil || pid <= 0 || !processAlive(pid) {
		return nil
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return errors.New("cannot verify the recorded server process, leaving it alone")
	}
	if !bytes.Contains(cmdline, []byte(dir)) {
		return nil
	}
	if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	return poll(context.Background(), 100, 100*time.Millisecond, 15*time.Second, "wait for stale server exit",
		func(context.Context) error {
			if processAlive(pid) {
				return errors.New("still running")
			}
			return nil
		})
}

// processAlive reports whether pid exists. EPERM means it exists but
// belongs to someone else, which still counts as alive.
func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
