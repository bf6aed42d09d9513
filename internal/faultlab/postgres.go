package faultlab

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Postgres is a throwaway PostgreSQL server started from the installed
// binaries. It listens on 127.0.0.1:Port only, keeps everything under Dir,
// and survives Stop/Start cycles on the same port and data until Close.
// Its methods are safe for concurrent use.
type Postgres struct {
	// Port is the TCP port on 127.0.0.1; it stays the same across restarts
	// so clients can reconnect with the DSN they already have.
	Port int
	// Dir is the temporary directory holding the data directory ("data"),
	// the server log and the unix socket. Close removes it.
	Dir string

	bin  string
	user serverUser
	logf func(string, ...any)
	ns   *Netns // nil: the server listens on 127.0.0.1

	// mu serialises lifecycle changes (start, stop, close) so that a
	// Restart is never interleaved with a Close.
	mu     sync.Mutex
	closed bool
}

// PostgresOptions tune StartPostgres. The zero value is ready to use.
type PostgresOptions struct {
	// ExtraConf adds postgresql.conf settings, overriding faultlab's
	// defaults. Values are written single-quoted, which PostgreSQL accepts
	// for every type, so pass them unquoted: {"statement_timeout": "5s"}.
	ExtraConf map[string]string
	// Logf, if set, receives progress messages (commands run, timings);
	// t.Logf fits.
	Logf func(format string, args ...any)
	// Netns, if set, runs the server inside that namespace, listening on
	// its ServerIP and trusting clients from its HostIP. Admin work then
	// goes over the unix socket, so that no network fault reaches it.
	Netns *Netns
}

// pgStartAttempts bounds retries when the free port was taken between
// freePort and the server's bind.
const pgStartAttempts = 3

// StartPostgres creates a fresh cluster with initdb, starts it on a free
// 127.0.0.1 port and creates the database "test". Authentication is
// "trust" for the superuser "postgres", so DSN needs no password. On
// failure nothing is left behind and the error carries the server log's
// tail. Call Close when done.
func StartPostgres(ctx context.Context, opts PostgresOptions) (*Postgres, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	bin, err := PostgresBinDir()
	if err != nil {
		return nil, err
	}
	u, err := lookupServerUser("postgres")
	if err != nil {
		return nil, err
	}
	sweepStale(logf)
	dir, err := newLabDir("pg", u)
	if err != nil {
		return nil, err
	}
	p := &Postgres{Dir: dir, bin: bin, user: u, logf: logf, ns: opts.Netns}
	ok := false
	defer func() {
		if !ok {
			p.Close()
		}
	}()

	if err := p.initdb(ctx); err != nil {
		return nil, err
	}
	if err := p.trustNetns(); err != nil {
		return nil, err
	}
	if err := p.startOnFreePort(ctx, opts.ExtraConf); err != nil {
		return nil, err
	}
	if err := p.Exec(ctx, "CREATE DATABASE test"); err != nil {
		return nil, withLog(fmt.Errorf("faultlab: create database test: %w", err), p.logPath())
	}
	ok = true
	return p, nil
}

// DSN returns a pgx/libpq URL for database db as the superuser, e.g.
// "postgres://postgres@127.0.0.1:PORT/test?sslmode=disable".
func (p *Postgres) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", p.Addr(), db)
}

// Addr returns "127.0.0.1:PORT", for example as a Proxy target, or
// "ServerIP:PORT" inside a Netns.
func (p *Postgres) Addr() string { return net.JoinHostPort(p.host(), strconv.Itoa(p.Port)) }

// host is the address the server listens on.
func (p *Postgres) host() string {
	if p.ns != nil {
		return p.ns.ServerIP
	}
	return loopbackHost
}

// SocketDSN returns a keyword/value DSN for database db over the unix
// socket, which no network fault touches.
func (p *Postgres) SocketDSN(db string) string {
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", p.Dir, p.Port, db)
}

// trustNetns lets clients from the namespace's other end in: initdb only
// trusts loopback.
func (p *Postgres) trustNetns() error {
	if p.ns == nil {
		return nil
	}
	f, err := os.OpenFile(filepath.Join(p.dataDir(), "pg_hba.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("faultlab: open pg_hba.conf: %w", err)
	}
	if _, err := fmt.Fprintf(f, "\nhost all all %s/32 trust\n", p.ns.HostIP); err != nil {
		f.Close()
		return fmt.Errorf("faultlab: append to pg_hba.conf: %w", err)
	}
	return f.Close()
}

// dataDir is the cluster's data directory inside Dir.
func (p *Postgres) dataDir() string { return filepath.Join(p.Dir, "data") }

// logPath is the server log written by pg_ctl -l.
func (p *Postgres) logPath() string { return filepath.Join(p.Dir, "postgres.log") }

// initdb creates the cluster. --no-sync because the data is throwaway,
// and the C locale with UTF8 so the result does not depend on which
// locales the machine happens to have generated.
func (p *Postgres) initdb(ctx context.Context) error {
	cmd := p.user.command(ctx, p.Dir, filepath.Join(p.bin, "initdb"),
		"-D", p.dataDir(), "-A", "trust", "-U", "postgres", "--no-sync",
		"-E", "UTF8", "--locale=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("faultlab: initdb: %w\n%s", err, out)
	}
	return nil
}

// startOnFreePort picks a port, writes the config and starts the server,
// retrying with a new port only when the old one turned out to be taken.
func (p *Postgres) startOnFreePort(ctx context.Context, extra map[string]string) error {
	var err error
	for attempt := 1; attempt <= pgStartAttempts; attempt++ {
		if p.Port, err = freePort(); err != nil {
			return err
		}
		if err = p.writeConf(extra); err != nil {
			return err
		}
		os.Remove(p.logPath()) // so the port-in-use check reads this attempt only
		if err = p.Start(ctx); err == nil || !isPortInUse(tailFile(p.logPath())) {
			return err
		}
		p.logf("faultlab: postgres port %d was taken, retrying (%d/%d)", p.Port, attempt, pgStartAttempts)
	}
	return err
}

// pgConfFile is included from postgresql.conf; keeping our settings in a
// file of their own lets a retry rewrite them without editing the
// initdb-generated file twice. ALTER SYSTEM still overrides them, since
// postgresql.auto.conf is read last.
const pgConfFile = "faultlab.conf"

// writeConf writes faultlab.conf and makes postgresql.conf include it.
func (p *Postgres) writeConf(extra map[string]string) error {
	settings := map[string]string{
		"listen_addresses":        p.host(),
		"port":                    strconv.Itoa(p.Port),
		"unix_socket_directories": p.Dir,
		// Durability is pointless for throwaway data and costs seconds.
		"fsync":              "off",
		"synchronous_commit": "off",
		"full_page_writes":   "off",
		"max_connections":    "100",
		// pg_ctl -l captures stderr into Dir/postgres.log.
		"logging_collector": "off",
		"log_destination":   "stderr",
	}
	for k, v := range extra {
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("# Written by faultlab; postgresql.auto.conf (ALTER SYSTEM) overrides it.\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = '%s'\n", k, strings.ReplaceAll(settings[k], "'", "''"))
	}
	confPath := filepath.Join(p.dataDir(), pgConfFile)
	if err := os.WriteFile(confPath, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("faultlab: write %s: %w", pgConfFile, err)
	}
	if err := p.user.chownTree(confPath); err != nil {
		return fmt.Errorf("faultlab: chown %s: %w", pgConfFile, err)
	}
	return p.includeConf()
}

// includeConf appends the include line to postgresql.conf once.
func (p *Postgres) includeConf() error {
	confMain := filepath.Join(p.dataDir(), "postgresql.conf")
	content, err := os.ReadFile(confMain)
	if err != nil {
		return fmt.Errorf("faultlab: read postgresql.conf: %w", err)
	}
	line := fmt.Sprintf("include '%s'\n", pgConfFile)
	if strings.Contains(string(content), line) {
		return nil
	}
	f, err := os.OpenFile(confMain, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("faultlab: open postgresql.conf: %w", err)
	}
	if _, err := f.WriteString("\n" + line); err != nil {
		f.Close()
		return fmt.Errorf("faultlab: append to postgresql.conf: %w", err)
	}
	return f.Close()
}
