package faultlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// PgBouncer is a throwaway PgBouncer in front of one PostgreSQL server,
// listening on 127.0.0.1:Port with its own ini, auth file, log and unix
// socket under Dir. It keeps its port across Stop/Start until Close. Its
// methods are safe for concurrent use.
type PgBouncer struct {
	// Port is the TCP port on 127.0.0.1, the same across restarts.
	Port int
	// Dir holds pgbouncer.ini, userlist.txt and pgbouncer.log.
	Dir string

	d        *daemon
	closed   atomic.Bool
	adminPwd string // the admin user's password in userlist.txt
}

// PgBouncerOptions configure StartPgBouncer.
type PgBouncerOptions struct {
	// Target is the PostgreSQL server, "127.0.0.1:PORT"; every database
	// name is forwarded to it.
	Target string
	// PoolMode is "session" (the default), "transaction" or "statement".
	PoolMode string
	// AuthType is "trust" (the default), "md5", "scram-sha-256" or
	// "plain". Users must name every client user, with the password
	// pgbouncer checks and then uses to log in to PostgreSQL.
	AuthType string
	// Users maps user names to plain-text passwords for the auth file.
	// "postgres" is always there: it is the admin user, with password ""
	// under trust and a random one otherwise, unless Users sets it. DSN
	// carries no password; connect as another user for password logins.
	Users map[string]string
	// Settings add or override [pgbouncer] settings, e.g.
	// {"server_login_retry": "2"}.
	Settings map[string]string
	// Logf, if set, receives progress messages; t.Logf fits.
	Logf func(format string, args ...any)
}

// pgbouncerReadyTimeout bounds a start; PgBouncer is up in milliseconds.
const pgbouncerReadyTimeout = 15 * time.Second

// StartPgBouncer writes the configuration and starts pgbouncer on a free
// port, as the "postgres" OS user when running as root (pgbouncer refuses
// root). It returns once the admin console answers. Call Close when done.
func StartPgBouncer(ctx context.Context, opts PgBouncerOptions) (*PgBouncer, error) {
	if err := checkLoopback(opts.Target); err != nil {
		return nil, err
	}
	d, err := newDaemon("pgbouncer", "pgbouncer", "pgbouncer.out", opts.Logf)
	if err != nil {
		return nil, err
	}
	dir := d.dir
	d.args = []string{filepath.Join(dir, "pgbouncer.ini")}
	b := &PgBouncer{Dir: dir, d: d}
	ok := false
	defer func() {
		if !ok {
			b.Close()
		}
	}()
	if err := b.writeUsers(opts); err != nil {
		return nil, err
	}
	for attempt := 1; attempt <= pgStartAttempts; attempt++ {
		if b.Port, err = freePort(); err != nil {
			return nil, err
		}
		if err = b.writeIni(opts); err != nil {
			return nil, err
		}
		os.Remove(b.logPath())
		if err = b.Start(ctx); err == nil || !isPortInUse(tailFile(b.logPath())) {
			break
		}
		b.d.logf("faultlab: pgbouncer port %d was taken, retrying (%d/%d)", b.Port, attempt, pgStartAttempts)
	}
	if err != nil {
		return nil, err
	}
	ok = true
	return b, nil
}

// Addr returns "127.0.0.1:PORT".
func (b *PgBouncer) Addr() string { return loopbackAddr(b.Port) }

// DSN returns a pgx URL for database db through PgBouncer as "postgres".
func (b *PgBouncer) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", b.Addr(), db)
}

func (b *PgBouncer) logPath() string { return filepath.Join(b.Dir, "pgbouncer.log") }

// Pid returns the running pgbouncer's pid, or 0.
func (b *PgBouncer) Pid() int { return b.d.pid() }

// writeUsers writes userlist.txt, the auth file: "user" "password" lines.
func (b *PgBouncer) writeUsers(opts PgBouncerOptions) error {
	users := map[string]string{"postgres": ""}
	if opts.AuthType != "" && opts.AuthType != "trust" && opts.AuthType != "any" {
		var raw [12]byte
		rand.Read(raw[:])
		users["postgres"] = hex.EncodeToString(raw[:])
	}
	maps.Copy(users, opts.Users)
	b.adminPwd = users["postgres"]
	var sb strings.Builder
	for _, name := range slices.Sorted(maps.Keys(users)) {
		fmt.Fprintf(&sb, "%s %s\n", pgbQuote(name), pgbQuote(users[name]))
	}
	return b.writeFile("userlist.txt", sb.String())
}

// pgbQuote quotes for the auth file, where a '"' is doubled.
func pgbQuote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// writeIni writes pgbouncer.ini for the current port.
func (b *PgBouncer) writeIni(opts PgBouncerOptions) error {
	settings := map[string]string{
		"listen_addr":     loopbackHost,
		"listen_port":     strconv.Itoa(b.Port),
		"unix_socket_dir": b.Dir,
		"auth_type":       "trust",
		"auth_file":       filepath.Join(b.Dir, "userlist.txt"),
		"admin_users":     "postgres",
		"pool_mode":       "session",
		"logfile":         b.logPath(),
		"pidfile":         filepath.Join(b.Dir, "pgbouncer.pid"),
		"max_client_conn": "500",
		// Room for two pools of 10 in session mode plus admin sessions.
		"default_pool_size": "50",
		// pgx sends none of these, other clients may.
		"ignore_startup_parameters": "extra_float_digits",
	}
	if opts.PoolMode != "" {
		settings["pool_mode"] = opts.PoolMode
	}
	if opts.AuthType != "" {
		settings["auth_type"] = opts.AuthType
	}
	maps.Copy(settings, opts.Settings)
	host, port, _ := strings.Cut(opts.Target, ":")
	var sb strings.Builder
	sb.WriteString("; Written by faultlab.\n[databases]\n")
	fmt.Fprintf(&sb, "* = host=%s port=%s\n\n[pgbouncer]\n", host, port)
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		fmt.Fprintf(&sb, "%s = %s\n", k, settings[k])
	}
	return b.writeFile("pgbouncer.ini", sb.String())
}

func (b *PgBouncer) writeFile(name, content string) error {
	path := filepath.Join(b.Dir, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("faultlab: write %s: %w", name, err)
	}
	return b.d.user.chownTree(path)
}

// Start starts pgbouncer again on the same port (a no-op if it runs) and
// returns once its admin console answers.
func (b *PgBouncer) Start(ctx context.Context) error {
	if b.closed.Load() {
		return ErrClosed
	}
	if err := b.d.start(); err != nil {
		return err
	}
	start := time.Now()
	err := poll(ctx, 300, 20*time.Millisecond, pgbouncerReadyTimeout, "wait for pgbouncer to accept connections",
		func(ctx context.Context) error {
			if err := b.d.exitedErr(); err != nil {
				return err
			}
			_, err := b.Show(ctx, "VERSION")
			return err
		})
	if err != nil {
		b.d.stop(syscall.SIGKILL, 0)
		return withLog(err, b.logPath())
	}
	b.d.logf("faultlab: pgbouncer on %s ready after %v", b.Addr(), time.Since(start).Round(time.Millisecond))
	return nil
}

// Stop stops pgbouncer. StopFast sends SIGTERM, which PgBouncer 1.18
// treats as an immediate shutdown (like SHUTDOWN): clients get EOF, with
// no error message; StopImmediate sends SIGKILL. It returns once the
// process has exited.
func (b *PgBouncer) Stop(mode StopMode) error {
	sig := syscall.SIGTERM
	if mode == StopImmediate {
		sig = syscall.SIGKILL
	}
	return b.d.stop(sig, 10*time.Second)
}

// Restart stops pgbouncer with mode and starts it again.
func (b *PgBouncer) Restart(ctx context.Context, mode StopMode) error {
	if err := b.Stop(mode); err != nil {
		return err
	}
	return b.Start(ctx)
}

// Running reports whether the pgbouncer process is alive; after an admin
// SHUTDOWN it is not.
func (b *PgBouncer) Running() bool { return b.d.current() != nil }

// WaitExit waits up to d for pgbouncer to exit (after SHUTDOWN).
func (b *PgBouncer) WaitExit(d time.Duration) error {
	p := b.d.current()
	if p == nil || waitDone(p.done, d) {
		return nil
	}
	return errors.New("faultlab: pgbouncer still running")
}

// Close kills pgbouncer and removes Dir. It is idempotent.
func (b *PgBouncer) Close() error {
	if b.closed.Swap(true) {
		return nil
	}
	err := b.d.stop(syscall.SIGKILL, 0)
	return errors.Join(err, os.RemoveAll(b.Dir))
}
