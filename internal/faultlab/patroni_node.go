package faultlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// PatroniNode is one Patroni process and the PostgreSQL it runs, which
// Patroni creates (initdb or a base backup of the leader) and starts.
type PatroniNode struct {
	Name string
	// Port is its PostgreSQL's port, APIPort its REST API's, on 127.0.0.1.
	Port, APIPort int
	// Dir holds patroni.yml, patroni.log and the data directory ("data",
	// where the stale sweep looks for a postmaster.pid).
	Dir string

	d      *daemon
	closed atomic.Bool
}

func newPatroniNode(name, pgBin string, logf func(string, ...any)) (*PatroniNode, error) {
	d, err := newDaemon("patroni", "patroni", "patroni.log", logf)
	if err != nil {
		return nil, err
	}
	dir := d.dir
	n := &PatroniNode{Name: name, Dir: dir, d: d}
	// Free ports are only reserved until Patroni binds them; a clash makes
	// the start fail, and the cluster start with it, which is rare enough.
	if n.Port, err = freePort(); err == nil {
		n.APIPort, err = freePort()
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	d.name = "patroni " + name
	d.args = []string{filepath.Join(dir, "patroni.yml")}
	d.env = []string{"HOME=" + dir, "PATH=" + pgBin + ":/usr/bin:/bin"}
	return n, nil
}

// Addr returns the node's PostgreSQL address, "127.0.0.1:PORT".
func (n *PatroniNode) Addr() string { return loopbackAddr(n.Port) }

// DSN returns a pgx URL straight to the node's PostgreSQL, bypassing
// HAProxy, for database db as "postgres".
func (n *PatroniNode) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", n.Addr(), db)
}

func (n *PatroniNode) dataDir() string { return filepath.Join(n.Dir, "data") }

// apiStatus returns the HTTP status of GET path on the node's REST API, or
// 0 if it does not answer within a second.
func (n *PatroniNode) apiStatus(ctx context.Context, path string) int {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+loopbackAddr(n.APIPort)+path, nil)
	if err != nil {
		return 0
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// PostmasterPid returns the pid of the node's running postmaster, read from
// its postmaster.pid and checked against /proc so that a stale file or a
// reused pid is never taken for it.
func (n *PatroniNode) PostmasterPid() (int, error) {
	raw, err := os.ReadFile(filepath.Join(n.dataDir(), "postmaster.pid"))
	if err != nil {
		return 0, fmt.Errorf("faultlab: %s: %w", n.Name, err)
	}
	first, _, _ := strings.Cut(string(raw), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("faultlab: %s: bad postmaster.pid", n.Name)
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil || !bytes.Contains(cmdline, []byte(n.Dir)) {
		return 0, fmt.Errorf("faultlab: %s: postmaster %d is not running", n.Name, pid)
	}
	return pid, nil
}

// KillPostgres sends SIGKILL to the node's postmaster, a crash of the
// database under a running Patroni. Its backends notice and exit at once.
func (n *PatroniNode) KillPostgres() error {
	pid, err := n.PostmasterPid()
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("faultlab: kill -9 %d: %w", pid, err)
	}
	return nil
}

// Close kills Patroni and its PostgreSQL (SIGQUIT, as pg_ctl -m immediate,
// so shared memory is released) and removes Dir. It is idempotent.
func (n *PatroniNode) Close() error {
	if n.closed.Swap(true) {
		return nil
	}
	// Patroni first, so it does not restart what we stop.
	err := n.d.stop(syscall.SIGKILL, 0)
	if pid, perr := n.PostmasterPid(); perr == nil {
		syscall.Kill(pid, syscall.SIGQUIT)
		err = errors.Join(err, poll(context.Background(), 100, 100*time.Millisecond, 15*time.Second,
			"wait for "+n.Name+"'s postgres to exit", func(context.Context) error {
				if processAlive(pid) {
					return errors.New("still running")
				}
				return nil
			}))
	}
	return errors.Join(err, os.RemoveAll(n.Dir))
}

// pgWritable opens a connection to dsn and checks that it is a primary.
func pgWritable(ctx context.Context, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn+"&connect_timeout=2&application_name=faultlab-admin")
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var rec bool
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&rec); err != nil {
		return err
	}
	if rec {
		return errors.New("reached a standby")
	}
	return nil
}
