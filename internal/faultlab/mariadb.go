package faultlab

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
)

// MariaDB is a throwaway MariaDB server started from the installed
// binaries. It listens on 127.0.0.1:Port only, keeps everything under Dir,
// and survives Stop/Start cycles on the same port and data until Close.
// Its methods are safe for concurrent use.
type MariaDB struct {
	// Port is the TCP port on 127.0.0.1; it stays the same across restarts.
	Port int
	// Dir is the temporary directory holding the data directory ("data"),
	// the error log, the socket and the pid file. Close removes it.
	Dir string

	// adminUser is the account admin operations log in as: root until
	// setupAccounts has created mariadbAdminUser.
	adminUser string

	bins      MariaDBBins
	user      serverUser
	extraArgs []string
	logf      func(string, ...any)
	ns        *Netns // nil: the server listens on 127.0.0.1

	// mu serialises lifecycle changes; proc is the running server, or nil.
	mu     sync.Mutex
	proc   *mariadbProc
	closed bool
}

// MariaDBOptions tune StartMariaDB. The zero value is ready to use.
type MariaDBOptions struct {
	// ExtraArgs are appended to mariadbd's command line, after faultlab's
	// own options so they win, e.g. "--wait-timeout=5".
	ExtraArgs []string
	// Logf, if set, receives progress messages; t.Logf fits.
	Logf func(format string, args ...any)
	// Netns, if set, runs the server inside that namespace, listening on
	// its ServerIP; root may log in from its HostIP. Admin work then goes
	// over the unix socket, so that no network fault reaches it.
	Netns *Netns
}

// mariadbPidFile is the pid file name inside Dir, also read by the sweep.
const mariadbPidFile = "mariadbd.pid"

// mariadbStartAttempts bounds retries when the free port was taken between
// freePort and the server's bind.
const mariadbStartAttempts = 3

// StartMariaDB creates a fresh data directory with mariadb-install-db,
// starts mariadbd on a free 127.0.0.1 port and creates the database
// "test". The user root@127.0.0.1 has an empty password (the
// "--auth-root-authentication-method=normal" install creates it), so DSN
// needs no password. That root lacks the READ_ONLY ADMIN privilege, so
// SetReadOnly stops it like any application user; faultlab's own admin
// operations use a separate account. On failure nothing is left behind
// and the error carries the error log's tail. Call Close when done.
func StartMariaDB(ctx context.Context, opts MariaDBOptions) (*MariaDB, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	bins, err := MariaDBBinaries()
	if err != nil {
		return nil, err
	}
	u, err := lookupServerUser("mysql")
	if err != nil {
		return nil, err
	}
	sweepStale(logf)
	dir, err := newLabDir("mariadb", u)
	if err != nil {
		return nil, err
	}
	m := &MariaDB{Dir: dir, adminUser: "root", bins: bins, user: u, extraArgs: opts.ExtraArgs, logf: logf, ns: opts.Netns}
	ok := false
	defer func() {
		if !ok {
			m.Close()
		}
	}()

	if err := m.installDB(ctx); err != nil {
		return nil, err
	}
	if err := m.startOnFreePort(ctx); err != nil {
		return nil, err
	}
	if err := m.setupAccounts(ctx); err != nil {
		return nil, withLog(err, m.errLogPath())
	}
	ok = true
	return m, nil
}

// DSN returns a go-sql-driver/mysql DSN for database db as root with the
// empty password, e.g. "root@tcp(127.0.0.1:PORT)/test".
func (m *MariaDB) DSN(db string) string {
	return fmt.Sprintf("root@tcp(%s)/%s", m.Addr(), db)
}

// Addr returns "127.0.0.1:PORT", for example as a Proxy target, or
// "ServerIP:PORT" inside a Netns.
func (m *MariaDB) Addr() string { return net.JoinHostPort(m.host(), strconv.Itoa(m.Port)) }

// host is the address the server listens on.
func (m *MariaDB) host() string {
	if m.ns != nil {
		return m.ns.ServerIP
	}
	return loopbackHost
}

// clientHost is the address the server sees TCP clients come from, the
// host part of the accounts they log in as.
func (m *MariaDB) clientHost() string {
	if m.ns != nil {
		return m.ns.HostIP
	}
	return loopbackHost
}

// socketPath is the server's unix socket.
func (m *MariaDB) socketPath() string { return filepath.Join(m.Dir, "mariadbd.sock") }

// SocketDSN returns a DSN for database db as root over the unix socket,
// which no network fault touches.
func (m *MariaDB) SocketDSN(db string) string {
	return fmt.Sprintf("root@unix(%s)/%s", m.socketPath(), db)
}

// dataDir is the server's data directory inside Dir.
func (m *MariaDB) dataDir() string { return filepath.Join(m.Dir, "data") }

// tmpDir is the server's own temporary directory: servers sharing /tmp
// remove each other's "#sql" files at startup, which once broke a
// concurrent mariadb-install-db.
func (m *MariaDB) tmpDir() string { return filepath.Join(m.Dir, "tmp") }

// errLogPath is mariadbd's --log-error file.
func (m *MariaDB) errLogPath() string { return filepath.Join(m.Dir, "err.log") }

// installDB creates the system tables. "normal" root authentication is
// what creates root@127.0.0.1 with an empty password; the default,
// unix_socket, would only admit the OS root user over the socket.
func (m *MariaDB) installDB(ctx context.Context) error {
	if err := os.Mkdir(m.tmpDir(), 0o700); err != nil {
		return fmt.Errorf("faultlab: create tmpdir: %w", err)
	}
	if err := m.user.chownTree(m.tmpDir()); err != nil {
		return fmt.Errorf("faultlab: chown tmpdir: %w", err)
	}
	cmd := m.user.command(ctx, m.Dir, m.bins.InstallDB,
		"--no-defaults", "--datadir="+m.dataDir(), "--tmpdir="+m.tmpDir(),
		"--auth-root-authentication-method=normal", "--skip-test-db")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("faultlab: mariadb-install-db: %w\n%s", err, out)
	}
	return nil
}

// startOnFreePort picks a port and starts the server, retrying with a new
// port only when the old one turned out to be taken.
func (m *MariaDB) startOnFreePort(ctx context.Context) error {
	var err error
	for attempt := 1; attempt <= mariadbStartAttempts; attempt++ {
		if m.Port, err = freePort(); err != nil {
			return err
		}
		os.Remove(m.errLogPath()) // so the port-in-use check reads this attempt only
		if err = m.Start(ctx); err == nil || !isPortInUse(tailFile(m.errLogPath())) {
			return err
		}
		m.logf("faultlab: mariadb port %d was taken, retrying (%d/%d)", m.Port, attempt, mariadbStartAttempts)
	}
	return err
}

// mariadbAdminUser is the passwordless account, with every privilege,
// that Exec, KillSessions and SetReadOnly log in as.
const mariadbAdminUser = "faultlab_admin"

// setupAccounts creates the admin account and the "test" database, and
// takes READ_ONLY ADMIN away from root@127.0.0.1. In MariaDB 10.11 "ALL
// PRIVILEGES" includes READ_ONLY ADMIN, which both bypasses read_only and
// is required to set it; left alone, root (the account DSN uses) would
// keep writing through SetReadOnly(true). This must happen before any
// client connects: global privilege changes only apply to new sessions.
//
// Inside a namespace clients come from its HostIP, for which the install
// made no account: root@HostIP is created like root@127.0.0.1, and admin
// work uses the socket (admin@localhost).
func (m *MariaDB) setupAccounts(ctx context.Context) error {
	admin := "'" + mariadbAdminUser + "'@'" + m.adminHost() + "'"
	root := "'root'@'" + m.clientHost() + "'"
	q := "CREATE USER " + admin + ";" +
		"GRANT ALL PRIVILEGES ON *.* TO " + admin + " WITH GRANT OPTION;"
	if m.ns != nil {
		q += "CREATE USER " + root + ";GRANT ALL PRIVILEGES ON *.* TO " + root + " WITH GRANT OPTION;"
	}
	q += "REVOKE READ_ONLY ADMIN ON *.* FROM " + root + ";CREATE DATABASE test"
	if err := m.Exec(ctx, q); err != nil {
		return fmt.Errorf("faultlab: set up accounts: %w", err)
	}
	m.adminUser = mariadbAdminUser
	return nil
}

// serverArgs is mariadbd's command line. --no-defaults keeps the system
// my.cnf (and the system server's settings) out; durability is traded for
// speed since the data is throwaway; --skip-name-resolve avoids reverse
// DNS on every connection, which would stall on a machine without DNS.
func (m *MariaDB) serverArgs() []string {
	args := []string{
		"--no-defaults",
		"--datadir=" + m.dataDir(),
		fmt.Sprintf("--port=%d", m.Port),
		"--bind-address=" + m.host(),
		"--socket=" + m.socketPath(),
		"--tmpdir=" + m.tmpDir(),
		"--pid-file=" + filepath.Join(m.Dir, mariadbPidFile),
		"--log-error=" + m.errLogPath(),
		"--skip-name-resolve",
		"--skip-log-bin",
		"--innodb-flush-log-at-trx-commit=0",
		"--innodb-doublewrite=0",
		"--innodb-buffer-pool-size=32M",
		"--character-set-server=utf8mb4",
		"--collation-server=utf8mb4_general_ci",
	}
	return append(args, m.extraArgs...)
}
