package faultlab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Etcd is a throwaway single-member etcd (the v3 API Patroni's etcd3
// section uses) on 127.0.0.1, its data under Dir.
type Etcd struct {
	// ClientPort serves clients; PeerPort is the (unused) peer port.
	ClientPort, PeerPort int
	// Dir holds the data directory and etcd.log.
	Dir string

	d      *daemon
	closed atomic.Bool
}

// StartEtcd starts etcd on free ports, as the "postgres" OS user when
// running as root, and returns once /health says so. Call Close when done.
func StartEtcd(ctx context.Context, logf func(string, ...any)) (*Etcd, error) {
	d, err := newDaemon("etcd", "etcd-server", "etcd.log", logf)
	if err != nil {
		return nil, err
	}
	dir := d.dir
	d.env = []string{"HOME=" + dir}
	e := &Etcd{Dir: dir, d: d}
	ok := false
	defer func() {
		if !ok {
			e.Close()
		}
	}()
	for attempt := 1; attempt <= pgStartAttempts; attempt++ {
		if e.ClientPort, err = freePort(); err != nil {
			return nil, err
		}
		if e.PeerPort, err = freePort(); err != nil {
			return nil, err
		}
		if err = e.start(ctx); err == nil || !isPortInUse(tailFile(e.d.out)) {
			break
		}
		logf("faultlab: etcd port %d or %d was taken, retrying (%d/%d)", e.ClientPort, e.PeerPort, attempt, pgStartAttempts)
	}
	if err != nil {
		return nil, err
	}
	ok = true
	return e, nil
}

// Endpoint returns "127.0.0.1:CLIENTPORT", as Patroni's etcd3.hosts wants.
func (e *Etcd) Endpoint() string { return loopbackAddr(e.ClientPort) }

func (e *Etcd) start(ctx context.Context) error {
	client := "http://" + e.Endpoint()
	peer := "http://" + loopbackAddr(e.PeerPort)
	e.d.args = []string{
		"--name", "faultlab", "--data-dir", filepath.Join(e.Dir, "data"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "faultlab=" + peer, "--initial-cluster-state", "new",
		"--initial-cluster-token", filepath.Base(e.Dir),
		// One member: elections are instant, so the defaults only cost time.
		"--heartbeat-interval", "50", "--election-timeout", "500",
		"--log-level", "warn",
	}
	os.Truncate(e.d.out, 0) // so the port-in-use check reads this attempt only
	if err := e.d.start(); err != nil {
		return err
	}
	start := time.Now()
	hc := http.Client{Timeout: time.Second}
	err := poll(ctx, 300, 50*time.Millisecond, 20*time.Second, "wait for etcd to be healthy",
		func(ctx context.Context) error {
			if err := e.d.exitedErr(); err != nil {
				return err
			}
			resp, err := hc.Get(client + "/health")
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
			if !strings.Contains(string(body), `"health":"true"`) {
				return fmt.Errorf("etcd /health: %s", body)
			}
			return nil
		})
	if err != nil {
		e.d.stop(syscall.SIGKILL, 0)
		return withLog(err, e.d.out)
	}
	e.d.logf("faultlab: etcd on %s ready after %v", e.Endpoint(), time.Since(start).Round(time.Millisecond))
	return nil
}

// Close kills etcd and removes Dir. It is idempotent.
func (e *Etcd) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	err := e.d.stop(syscall.SIGKILL, 0)
	return errors.Join(err, os.RemoveAll(e.Dir))
}
