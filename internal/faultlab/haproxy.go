package faultlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// HAProxy is a throwaway HAProxy in TCP mode on 127.0.0.1:Port that sends
// each new connection to the first server whose HTTP health check passes,
// the way Patroni clusters route clients to the leader.
type HAProxy struct {
	// Port is the frontend's TCP port on 127.0.0.1.
	Port int
	// Dir holds haproxy.cfg and haproxy.log.
	Dir string

	d      *daemon
	closed atomic.Bool
}

// HAProxyServer is one backend server.
type HAProxyServer struct {
	// Name labels the server in HAProxy's log.
	Name string
	// Addr is where client connections go, "127.0.0.1:PORT".
	Addr string
	// CheckPort is the port of its HTTP health check (Patroni's REST API).
	CheckPort int
}

// HAProxyOptions configure StartHAProxy.
type HAProxyOptions struct {
	Servers []HAProxyServer
	// CheckPath is the health check's URL path; a server is up while it
	// answers 200. Patroni's "/primary" answers 200 on the leader only.
	CheckPath string
	// CheckInterval is the time between checks (default 200 ms). A server
	// is marked down after one failed check and its sessions are closed
	// (on-marked-down shutdown-sessions), up after one good one.
	CheckInterval time.Duration
	Logf          func(format string, args ...any)
}

// StartHAProxy starts haproxy in the foreground (-db) on a free port, as
// the "postgres" OS user when running as root, and returns once the
// frontend accepts TCP connections. Call Close when done.
func StartHAProxy(ctx context.Context, opts HAProxyOptions) (*HAProxy, error) {
	for _, s := range opts.Servers {
		if err := checkLoopback(s.Addr); err != nil {
			return nil, err
		}
	}
	d, err := newDaemon("haproxy", "haproxy", "haproxy.log", opts.Logf)
	if err != nil {
		return nil, err
	}
	dir := d.dir
	h := &HAProxy{Dir: dir, d: d}
	cfg := filepath.Join(dir, "haproxy.cfg")
	d.args = []string{"-db", "-f", cfg}
	ok := false
	defer func() {
		if !ok {
			h.Close()
		}
	}()
	for attempt := 1; attempt <= pgStartAttempts; attempt++ {
		if h.Port, err = freePort(); err != nil {
			return nil, err
		}
		if err := os.WriteFile(cfg, []byte(h.config(opts)), 0o644); err != nil {
			return nil, fmt.Errorf("faultlab: write haproxy.cfg: %w", err)
		}
		os.Truncate(h.d.out, 0)
		if err = h.start(ctx); err == nil || !strings.Contains(tailFile(h.d.out), "cannot bind") {
			break
		}
		h.d.logf("faultlab: haproxy port %d was taken, retrying (%d/%d)", h.Port, attempt, pgStartAttempts)
	}
	if err != nil {
		return nil, err
	}
	ok = true
	return h, nil
}

// config renders haproxy.cfg. Client and server timeouts are long so
// idle pooled connections are not cut by HAProxy itself.
func (h *HAProxy) config(opts HAProxyOptions) string {
	inter := opts.CheckInterval
	if inter <= 0 {
		inter = 200 * time.Millisecond
	}
	path := opts.CheckPath
	if path == "" {
		path = "/"
	}
	var b strings.Builder
	fmt.Fprintf(&b, `# Written by faultlab.
global
    maxconn 1000
defaults
    mode tcp
    log stdout format raw local0 warning
    timeout connect 1s
    timeout client 30m
    timeout server 30m
    timeout check 1s
listen db
    bind %s
    option httpchk GET %s
    http-check expect status 200
    default-server inter %dms fastinter %dms downinter %dms fall 1 rise 1 on-marked-down shutdown-sessions
`, h.Addr(), path, inter.Milliseconds(), inter.Milliseconds(), inter.Milliseconds())
	for _, s := range opts.Servers {
		fmt.Fprintf(&b, "    server %s %s check port %d\n", s.Name, s.Addr, s.CheckPort)
	}
	return b.String()
}

// Addr returns "127.0.0.1:PORT".
func (h *HAProxy) Addr() string { return loopbackAddr(h.Port) }

func (h *HAProxy) start(ctx context.Context) error {
	if err := h.d.start(); err != nil {
		return err
	}
	start := time.Now()
	err := poll(ctx, 200, 50*time.Millisecond, 10*time.Second, "wait for haproxy to listen",
		func(ctx context.Context) error {
			if err := h.d.exitedErr(); err != nil {
				return err
			}
			c, err := net.DialTimeout("tcp4", h.Addr(), time.Second)
			if err != nil {
				return err
			}
			return c.Close()
		})
	if err != nil {
		h.d.stop(syscall.SIGKILL, 0)
		return withLog(err, h.d.out)
	}
	h.d.logf("faultlab: haproxy on %s ready after %v", h.Addr(), time.Since(start).Round(time.Millisecond))
	return nil
}

// Close kills haproxy and removes Dir. It is idempotent.
func (h *HAProxy) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	err := h.d.stop(syscall.SIGKILL, 0)
	return errors.Join(err, os.RemoveAll(h.Dir))
}
