package faultlab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// PatroniCluster is a throwaway Patroni cluster: one etcd, Patroni nodes
// that each run their own PostgreSQL, and HAProxy routing clients to the
// leader by an HTTP check of Patroni's /primary. Clients use DSN, which
// goes through HAProxy.
type PatroniCluster struct {
	Etcd    *Etcd
	HAProxy *HAProxy
	Nodes   []*PatroniNode
	opts    PatroniOptions
}

// PatroniOptions configure StartPatroni. Zero values take the defaults.
type PatroniOptions struct {
	// Nodes is the number of Patroni nodes (default 2).
	Nodes int
	// TTL, LoopWait and RetryTimeout are Patroni's leader-key TTL, loop
	// interval and DCS retry timeout, in whole seconds (defaults 6, 1, 2;
	// Patroni's own are 30, 10, 10, and it wants LoopWait + 2 *
	// RetryTimeout <= TTL). Shorter loops make the cluster ready in about
	// 6.5 s instead of 12 and a crashed leader fail over in about 2 s.
	TTL, LoopWait, RetryTimeout time.Duration
	// Parameters add or override postgresql.conf settings on every node.
	Parameters map[string]string
	// Logf, if set, receives progress messages; t.Logf fits.
	Logf func(format string, args ...any)
}

// patroniReadyTimeout bounds a cluster start: etcd, the leader's initdb,
// the replica's base backup and the first synchronous standby.
const patroniReadyTimeout = 90 * time.Second

// StartPatroni starts etcd, the Patroni nodes and HAProxy, all as the
// "postgres" OS user when running as root, and returns once a leader
// serves writes through HAProxy and a replica is its synchronous standby
// (synchronous_mode: acknowledged commits survive a failover). Patroni's
// primary_start_timeout is 0: a leader whose PostgreSQL dies is failed
// over rather than restarted in place. On failure everything is removed.
// Call Close when done.
func StartPatroni(ctx context.Context, opts PatroniOptions) (*PatroniCluster, error) {
	if _, err := helperBinary("patroni", "patroni"); err != nil {
		return nil, err
	}
	if _, err := helperBinary("haproxy", "haproxy"); err != nil {
		return nil, err
	}
	bin, err := PostgresBinDir()
	if err != nil {
		return nil, err
	}
	if opts.Nodes <= 0 {
		opts.Nodes = 2
	}
	if opts.TTL <= 0 {
		opts.TTL = 6 * time.Second
	}
	if opts.LoopWait <= 0 {
		opts.LoopWait = time.Second
	}
	if opts.RetryTimeout <= 0 {
		opts.RetryTimeout = 2 * time.Second
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	ctx, cancel := withDeadline(ctx, patroniReadyTimeout)
	defer cancel()
	start := time.Now()
	c := &PatroniCluster{opts: opts}
	ok := false
	defer func() {
		if !ok {
			c.Close()
		}
	}()
	if c.Etcd, err = StartEtcd(ctx, opts.Logf); err != nil {
		return nil, err
	}
	scope := "faultlab-" + strconv.Itoa(os.Getpid()) + "-" + strconv.Itoa(c.Etcd.ClientPort)
	for i := range opts.Nodes {
		n, err := newPatroniNode(fmt.Sprintf("node%d", i+1), bin, opts.Logf)
		if err != nil {
			return nil, err
		}
		c.Nodes = append(c.Nodes, n)
		if err := n.writeConfig(scope, c.Etcd.Endpoint(), bin, opts); err != nil {
			return nil, err
		}
	}
	// The first node starts alone so that it, and not a race, bootstraps
	// the cluster; the others then clone it.
	for i, n := range c.Nodes {
		if err := n.d.start(); err != nil {
			return nil, err
		}
		if i == 0 {
			if _, err := c.waitLeader(ctx, nil); err != nil {
				return nil, err
			}
			opts.Logf("faultlab: patroni %s bootstrapped the cluster after %v", n.Name, time.Since(start).Round(time.Millisecond))
		}
	}
	servers := make([]HAProxyServer, len(c.Nodes))
	for i, n := range c.Nodes {
		servers[i] = HAProxyServer{Name: n.Name, Addr: n.Addr(), CheckPort: n.APIPort}
	}
	if c.HAProxy, err = StartHAProxy(ctx, HAProxyOptions{Servers: servers, CheckPath: "/primary", Logf: opts.Logf}); err != nil {
		return nil, err
	}
	if err := c.WaitReady(ctx); err != nil {
		return nil, err
	}
	opts.Logf("faultlab: patroni cluster of %d ready behind %s after %v", len(c.Nodes), c.HAProxy.Addr(), time.Since(start).Round(time.Millisecond))
	ok = true
	return c, nil
}

// DSN returns a pgx URL for database db through HAProxy as "postgres".
func (c *PatroniCluster) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", c.HAProxy.Addr(), db)
}

// Leader returns the node whose /primary answers 200, or an error if none
// does right now.
func (c *PatroniCluster) Leader(ctx context.Context) (*PatroniNode, error) {
	for _, n := range c.Nodes {
		if n.apiStatus(ctx, "/primary") == http.StatusOK {
			return n, nil
		}
	}
	return nil, errors.New("faultlab: no patroni node is the leader")
}

// waitLeader waits until a node other than not is the leader.
func (c *PatroniCluster) waitLeader(ctx context.Context, not *PatroniNode) (*PatroniNode, error) {
	var leader *PatroniNode
	err := poll(ctx, 1200, 50*time.Millisecond, patroniReadyTimeout, "wait for a patroni leader",
		func(ctx context.Context) error {
			for _, n := range c.Nodes {
				if err := n.d.diedErr(); err != nil {
					return err
				}
			}
			l, err := c.Leader(ctx)
			if err == nil && l == not {
				err = errors.New("the old leader still leads")
			}
			leader = l
			return err
		})
	if err != nil {
		return nil, c.withLogs(err)
	}
	return leader, nil
}

// WaitReady waits until a leader serves writes through HAProxy and every
// other node is a synchronous standby (/sync answers 200).
func (c *PatroniCluster) WaitReady(ctx context.Context) error {
	err := poll(ctx, 1200, 50*time.Millisecond, patroniReadyTimeout, "wait for the patroni cluster",
		func(ctx context.Context) error {
			leader, err := c.Leader(ctx)
			if err != nil {
				return err
			}
			for _, n := range c.Nodes {
				if err := n.d.exitedErr(); err != nil {
					return err
				}
				if n != leader && n.apiStatus(ctx, "/sync") != http.StatusOK {
					return errors.New(n.Name + " is not a synchronous standby yet")
				}
			}
			return pgWritable(ctx, c.DSN("postgres"))
		})
	return c.withLogs(err)
}

// withLogs appends each node's log tail to err.
func (c *PatroniCluster) withLogs(err error) error {
	if err == nil {
		return nil
	}
	for _, n := range c.Nodes {
		err = withLog(err, n.d.out)
	}
	return err
}

// Close stops HAProxy, every node with its PostgreSQL, and etcd, and
// removes their directories. It is idempotent.
func (c *PatroniCluster) Close() error {
	var errs []error
	if c.HAProxy != nil {
		errs = append(errs, c.HAProxy.Close())
	}
	for _, n := range c.Nodes {
		errs = append(errs, n.Close())
	}
	if c.Etcd != nil {
		errs = append(errs, c.Etcd.Close())
	}
	return errors.Join(errs...)
}

// patroniConfig is the node's YAML configuration, written as JSON (which
// YAML reads).
func (n *PatroniNode) writeConfig(scope, etcd, bin string, opts PatroniOptions) error {
	params := map[string]any{
		"unix_socket_directories": n.Dir,
		"fsync":                   "off",
		"full_page_writes":        "on", // pg_rewind needs it
		"wal_log_hints":           "on",
		"synchronous_commit":      "on",
		"max_connections":         "100",
		"wal_keep_size":           "256MB",
		"logging_collector":       "off",
	}
	for k, v := range opts.Parameters {
		params[k] = v
	}
	hba := []string{
		"local all all trust",
		"host all all 127.0.0.1/32 trust",
		"host replication all 127.0.0.1/32 trust",
	}
	cfg := map[string]any{
		"scope":     scope,
		"namespace": "/faultlab/",
		"name":      n.Name,
		"log":       map[string]any{"level": "INFO"},
		"restapi":   map[string]any{"listen": loopbackAddr(n.APIPort), "connect_address": loopbackAddr(n.APIPort)},
		"etcd3":     map[string]any{"hosts": []string{etcd}},
		"bootstrap": map[string]any{
			"dcs": map[string]any{
				"ttl":                   int(opts.TTL.Seconds()),
				"loop_wait":             int(opts.LoopWait.Seconds()),
				"retry_timeout":         int(opts.RetryTimeout.Seconds()),
				"primary_start_timeout": 0,
				"synchronous_mode":      true,
				"postgresql":            map[string]any{"use_pg_rewind": true, "parameters": maps.Clone(params)},
			},
			"initdb": []any{map[string]string{"encoding": "UTF8"}, map[string]string{"locale": "C"}},
		},
		"postgresql": map[string]any{
			"listen":          n.Addr(),
			"connect_address": n.Addr(),
			"data_dir":        n.dataDir(),
			"bin_dir":         bin,
			"pgpass":          filepath.Join(n.Dir, "pgpass"),
			"authentication": map[string]any{
				"superuser":   map[string]string{"username": "postgres"},
				"replication": map[string]string{"username": "postgres"},
				"rewind":      map[string]string{"username": "postgres"},
			},
			"parameters": params,
			"pg_hba":     hba,
		},
	}
	raw, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(n.Dir, "patroni.yml")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		return fmt.Errorf("faultlab: write patroni.yml: %w", err)
	}
	return n.d.user.chownTree(path)
}
