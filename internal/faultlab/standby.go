package faultlab

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// PGPair is a PostgreSQL primary with one streaming hot standby, made with
// pg_basebackup -R. While the standby is connected the primary names it in
// synchronous_standby_names, so a commit is acknowledged only once the
// standby has flushed it: a failover to it loses no acknowledged write.
// Promote and Rejoin move the roles; Node(0) is the first primary and
// Node(1) the first standby whatever their roles are now. Its methods are
// safe for concurrent use.
type PGPair struct {
	nodes [2]*Postgres
	conf  map[string]string // settings every node gets

	mu      sync.Mutex
	primary int // index of the current primary
}

// replicationConf is what streaming replication, synchronous commit and
// pg_rewind need on top of faultlab's defaults: pg_rewind refuses to run
// without wal_log_hints (or checksums) and full_page_writes.
var replicationConf = map[string]string{
	"wal_level":          "replica",
	"max_wal_senders":    "10",
	"wal_keep_size":      "256MB",
	"hot_standby":        "on",
	"wal_log_hints":      "on",
	"full_page_writes":   "on",
	"synchronous_commit": "on",
	// A standby reconnects to its primary within 200 ms, not 5 s.
	"wal_retrieve_retry_interval": "200ms",
}

// StartPGPair starts the primary (with opts.ExtraConf and the replication
// settings), makes the standby from a base backup of it and returns once
// the standby streams synchronously. On failure nothing is left behind.
// Call Close when done.
func StartPGPair(ctx context.Context, opts PostgresOptions) (*PGPair, error) {
	conf := maps.Clone(replicationConf)
	maps.Copy(conf, opts.ExtraConf)
	opts.ExtraConf = conf
	primary, err := StartPostgres(ctx, opts)
	if err != nil {
		return nil, err
	}
	r := &PGPair{conf: conf}
	r.nodes[0] = primary
	ok := false
	defer func() {
		if !ok {
			r.Close()
		}
	}()
	if r.nodes[1], err = primary.newStandby(ctx, conf); err != nil {
		return nil, err
	}
	if err := r.setSync(ctx, 0, true); err != nil {
		return nil, err
	}
	ok = true
	return r, nil
}

// Node returns node i (0 or 1).
func (r *PGPair) Node(i int) *Postgres { return r.nodes[i] }

// Primary returns the current primary.
func (r *PGPair) Primary() *Postgres {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nodes[r.primary]
}

// Standby returns the node that is not the current primary.
func (r *PGPair) Standby() *Postgres {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nodes[1-r.primary]
}

// Close stops both servers and removes their directories.
func (r *PGPair) Close() error {
	var errs []error
	for _, n := range r.nodes {
		if n != nil {
			errs = append(errs, n.Close())
		}
	}
	return errors.Join(errs...)
}

// newStandby makes a new node from a base backup of p and starts it as a
// streaming standby of p on a free port.
func (p *Postgres) newStandby(ctx context.Context, conf map[string]string) (*Postgres, error) {
	dir, err := newLabDir("pg", p.user)
	if err != nil {
		return nil, err
	}
	s := &Postgres{Dir: dir, bin: p.bin, user: p.user, logf: p.logf}
	ok := false
	defer func() {
		if !ok {
			s.Close()
		}
	}()
	start := time.Now()
	// -R writes standby.signal and primary_conninfo; -c fast starts at
	// once instead of waiting for a checkpoint.
	cmd := s.user.command(ctx, dir, filepath.Join(p.bin, "pg_basebackup"),
		"-D", s.dataDir(), "-R", "-X", "stream", "-c", "fast", "--no-sync",
		"-h", loopbackHost, "-p", strconv.Itoa(p.Port), "-U", "postgres")
	cmd.WaitDelay = 5 * time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("faultlab: pg_basebackup from %s: %w\n%s", p.Addr(), err, out)
	}
	// The backup copied the primary's faultlab.conf: give the standby its
	// own port and socket directory.
	if err := s.startOnFreePort(ctx, conf); err != nil {
		return nil, err
	}
	if err := p.waitStreaming(ctx, s); err != nil {
		return nil, err
	}
	p.logf("faultlab: standby %s of %s ready after %v", s.Addr(), p.Addr(), time.Since(start).Round(time.Millisecond))
	ok = true
	return s, nil
}

// setSync turns synchronous replication on node i on or off by rewriting
// its own faultlab.conf and reloading. Only a primary with a connected
// standby may have it on: with no standby every commit would wait forever.
func (r *PGPair) setSync(ctx context.Context, i int, on bool) error {
	conf := maps.Clone(r.conf)
	conf["synchronous_standby_names"] = ""
	if on {
		conf["synchronous_standby_names"] = "*"
	}
	n := r.nodes[i]
	if err := n.writeConf(conf); err != nil {
		return err
	}
	if !n.running() {
		return nil
	}
	if err := n.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	want := map[bool]string{true: "sync", false: "async"}[on]
	return poll(ctx, 250, 20*time.Millisecond, 10*time.Second, "wait for sync_state "+want+" on "+n.Addr(),
		func(ctx context.Context) error {
			state, err := n.queryString(ctx, "SELECT coalesce(max(sync_state), 'none') FROM pg_stat_replication")
			if err != nil || state == want || (!on && state == "none") {
				return err
			}
			return errors.New("sync_state is " + state)
		})
}

// Promote promotes the standby (pg_ctl promote) and returns once it
// accepts writes, in about 0.1 s. It becomes Primary(); the old primary is
// left as it is: stop it first for a planned switchover, or Rejoin it
// after. Synchronous replication stays off until Rejoin, so writes on the
// promoted node do not wait for a standby that is not there.
func (r *PGPair) Promote(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ctx, cancel := withDeadline(ctx, pgCtlTimeout)
	defer cancel()
	s := r.nodes[1-r.primary]
	if out, err := s.pgCtl(ctx, "-w", "-t", "30", "promote"); err != nil {
		return withLog(fmt.Errorf("faultlab: pg_ctl promote on %s: %w\n%s", s.Addr(), err, out), s.logPath())
	}
	err := poll(ctx, 250, 20*time.Millisecond, 10*time.Second, "wait for "+s.Addr()+" to leave recovery",
		func(ctx context.Context) error {
			v, err := s.queryString(ctx, "SELECT pg_is_in_recovery()::text")
			if err == nil && v != "false" {
				err = errors.New("still in recovery")
			}
			return err
		})
	if err != nil {
		return withLog(err, s.logPath())
	}
	r.primary = 1 - r.primary
	return nil
}

// Rejoin turns the node that is not Primary() into its standby again:
// stops it if it runs (fast), rewinds it with pg_rewind against the
// primary, starts it with primary_conninfo pointing there and turns
// synchronous replication back on. pg_rewind copies the primary's
// configuration files, so the node's own faultlab.conf and
// primary_conninfo are written again after it. It takes about a second.
func (r *PGPair) Rejoin(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ctx, cancel := withDeadline(ctx, 2*pgCtlTimeout)
	defer cancel()
	primary, old := r.nodes[r.primary], r.nodes[1-r.primary]
	if err := old.Stop(StopFast); err != nil {
		return err
	}
	start := time.Now()
	// A promoted server writes its new timeline to pg_control only at its
	// next checkpoint; before that pg_rewind sees one timeline and decides
	// that no rewind is needed.
	if err := primary.Exec(ctx, "CHECKPOINT"); err != nil {
		return err
	}
	src := primary.conninfo()
	cmd := old.user.command(ctx, old.Dir, filepath.Join(old.bin, "pg_rewind"),
		"-D", old.dataDir(), "--source-server="+src, "--no-sync")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return withLog(fmt.Errorf("faultlab: pg_rewind %s from %s: %w\n%s", old.Addr(), primary.Addr(), err, out), old.logPath())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	old.logf("faultlab: pg_rewind %s from %s: %s", old.Addr(), primary.Addr(), lines[len(lines)-1])
	if err := old.writeConf(r.conf); err != nil {
		return err
	}
	if err := old.followPrimary(primary); err != nil {
		return err
	}
	if err := old.Start(ctx); err != nil {
		return err
	}
	if err := primary.waitStreaming(ctx, old); err != nil {
		return err
	}
	if err := r.setSync(ctx, r.primary, true); err != nil {
		return err
	}
	old.logf("faultlab: %s rejoined as standby of %s after %v", old.Addr(), primary.Addr(), time.Since(start).Round(time.Millisecond))
	return nil
}

// conninfo is the libpq connection string a standby streams from.
func (p *Postgres) conninfo() string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres connect_timeout=5", loopbackHost, p.Port)
}

// followPrimary makes the stopped node p a standby of primary: standby.signal,
// and primary_conninfo in postgresql.auto.conf, replacing whatever pg_rewind
// copied there from the source (which names the source's own old primary).
func (p *Postgres) followPrimary(primary *Postgres) error {
	auto := filepath.Join(p.dataDir(), "postgresql.auto.conf")
	content, err := os.ReadFile(auto)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("faultlab: read postgresql.auto.conf: %w", err)
	}
	var b strings.Builder
	for _, line := range strings.Split(string(content), "\n") {
		if line != "" && !strings.HasPrefix(strings.TrimSpace(line), "primary_conninfo") {
			b.WriteString(line + "\n")
		}
	}
	fmt.Fprintf(&b, "primary_conninfo = '%s'\n", primary.conninfo())
	files := map[string]string{auto: b.String(), filepath.Join(p.dataDir(), "standby.signal"): ""}
	for path, body := range files {
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			return fmt.Errorf("faultlab: write %s: %w", filepath.Base(path), err)
		}
		if err := p.user.chownTree(path); err != nil {
			return err
		}
	}
	// A recovery.signal left over would not matter (standby.signal wins),
	// but keeps the node's state unambiguous.
	os.Remove(filepath.Join(p.dataDir(), "recovery.signal"))
	return nil
}

// waitStreaming waits until standby s streams from p.
func (p *Postgres) waitStreaming(ctx context.Context, s *Postgres) error {
	const q = "SELECT count(*)::text FROM pg_stat_replication WHERE state = 'streaming'"
	err := poll(ctx, 500, 20*time.Millisecond, 30*time.Second, "wait for "+s.Addr()+" to stream from "+p.Addr(),
		func(ctx context.Context) error {
			n, err := p.queryString(ctx, q)
			if err == nil && n == "0" {
				err = errors.New("no streaming standby")
			}
			return err
		})
	if err != nil {
		return withLog(err, s.logPath())
	}
	return nil
}

// InRecovery reports whether the server is a standby.
func (p *Postgres) InRecovery(ctx context.Context) (bool, error) {
	v, err := p.queryString(ctx, "SELECT pg_is_in_recovery()::text")
	return v == "true", err
}

// queryString runs a one-value query on a fresh admin connection.
func (p *Postgres) queryString(ctx context.Context, q string) (string, error) {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	conn, err := p.connect(ctx, "postgres")
	if err != nil {
		return "", err
	}
	defer conn.Close(context.Background())
	var v string
	err = conn.QueryRow(ctx, q).Scan(&v)
	return v, err
}
