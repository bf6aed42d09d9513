package integration

import (
	"context"
	"crypto/rand"
	"database/sql"
	"database/sql/driver"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// authLab is a throwaway server with real password authentication, of its
// own: the credential tests change roles and pg_hba.conf, which a shared
// server or one named by the environment must not see.
type authLab struct {
	name   string
	driver string // the wrapper's
	bare   string
	admin  *sql.DB // superuser, on the "test" database
	addr   string  // 127.0.0.1:port
	inner  driver.Driver

	// dsn is a DSN for user without a password, plus the wrapper's keys
	// (already escaped as the grammar needs).
	dsn func(user, password string, keys ...string) string
	// idQuery returns the session id, the user and a count over the probe
	// table, so that it needs the table privilege Vault revokes.
	idQuery string

	createUser  func(ctx context.Context, user, password string) error
	setPassword func(ctx context.Context, user, password string) error
	revokeDrop  func(ctx context.Context, user string) error // Vault's default: sessions stay open
	killUser    func(ctx context.Context, user string) (int, error)
	refused     func(err error) bool // the server refused the login
	revoked     func(err error) bool // an old session after revokeDrop
}

// startAuthLab starts the engine's server, or fails (CI) or skips (binaries
// missing) as requireServer does.
func startAuthLab(t *testing.T, engine string) *authLab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var lab *authLab
	var err error
	if engine == "postgres" {
		lab, err = startPgAuthLab(ctx, t)
	} else {
		lab, err = startMariaDBAuthLab(ctx, t)
	}
	if err != nil {
		switch {
		case os.Getenv("CI") != "":
			t.Fatalf("throwaway %s server with password authentication did not start (CI is set, so this is a failure): %v", engine, err)
		case errors.Is(err, faultlab.ErrNotInstalled):
			t.Skipf("no %s server: %v; install it (bash .ci/setup)", engine, err)
		default:
			t.Fatalf("throwaway %s server with password authentication did not start: %v", engine, err)
		}
	}
	return lab
}

func startPgAuthLab(ctx context.Context, t *testing.T) (*authLab, error) {
	p, err := faultlab.StartPostgres(ctx, faultlab.PostgresOptions{Logf: t.Logf})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { p.Close() })
	if err := p.RequirePasswords(ctx); err != nil {
		return nil, err
	}
	admin, err := sql.Open("pgx", p.DSN("test"))
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { admin.Close() })
	if _, err := admin.ExecContext(ctx, "CREATE TABLE cred_probe (n int); INSERT INTO cred_probe VALUES (1)"); err != nil {
		return nil, err
	}
	exec := func(ctx context.Context, q string) error { _, err := admin.ExecContext(ctx, q); return err }
	return &authLab{
		name: "postgres", driver: "resilientpg", bare: "pgx", admin: admin, addr: p.Addr(), inner: stdlib.GetDefaultDriver(),
		dsn: func(user, password string, keys ...string) string {
			return p.DSNFor(user, password, "test") + strings.Join(append([]string{""}, keys...), "&")
		},
		idQuery: "SELECT pg_backend_pid(), current_user::text, count(*) FROM cred_probe",
		createUser: func(ctx context.Context, user, password string) error {
			return exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'; GRANT SELECT ON cred_probe TO %[1]s", user, password))
		},
		setPassword: func(ctx context.Context, user, password string) error {
			return exec(ctx, fmt.Sprintf("ALTER ROLE %s PASSWORD '%s'", user, password))
		},
		revokeDrop: func(ctx context.Context, user string) error {
			// What Vault's PostgreSQL plugin does by default: the privileges
			// go, then the role; its sessions are left running.
			return exec(ctx, fmt.Sprintf("REVOKE ALL ON cred_probe FROM %s; DROP ROLE %[1]s", user))
		},
		killUser: func(ctx context.Context, user string) (int, error) {
			var n int
			err := admin.QueryRowContext(ctx, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity WHERE usename = $1", user).Scan(&n)
			return n, err
		},
		refused: func(err error) bool {
			var pe *pgconn.PgError
			return errors.As(err, &pe) && pe.Code == "28P01"
		},
		revoked: func(err error) bool {
			var pe *pgconn.PgError
			return errors.As(err, &pe) && (pe.Code == "42501" || pe.Code == "42704")
		},
	}, nil
}

func startMariaDBAuthLab(ctx context.Context, t *testing.T) (*authLab, error) {
	m, err := faultlab.StartMariaDB(ctx, faultlab.MariaDBOptions{Logf: t.Logf})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { m.Close() })
	admin, err := sql.Open("mysql", m.DSN("test")+"?multiStatements=true")
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { admin.Close() })
	if _, err := admin.ExecContext(ctx, "CREATE TABLE cred_probe (n int); INSERT INTO cred_probe VALUES (1)"); err != nil {
		return nil, err
	}
	exec := func(ctx context.Context, q string) error { _, err := admin.ExecContext(ctx, q); return err }
	return &authLab{
		name: "mysql", driver: "resilientmysql", bare: "mysql", admin: admin, addr: m.Addr(), inner: &mysql.MySQLDriver{},
		dsn: func(user, password string, keys ...string) string {
			if len(keys) == 0 {
				return m.DSNFor(user, password, "test")
			}
			return m.DSNFor(user, password, "test") + "?" + strings.Join(keys, "&")
		},
		idQuery: "SELECT CONNECTION_ID(), CURRENT_USER(), COUNT(*) FROM cred_probe",
		createUser: func(ctx context.Context, user, password string) error {
			return exec(ctx, fmt.Sprintf("CREATE USER '%s'@'127.0.0.1' IDENTIFIED BY '%s'; GRANT SELECT ON test.cred_probe TO '%[1]s'@'127.0.0.1'", user, password))
		},
		setPassword: func(ctx context.Context, user, password string) error {
			return exec(ctx, fmt.Sprintf("ALTER USER '%s'@'127.0.0.1' IDENTIFIED BY '%s'", user, password))
		},
		revokeDrop: func(ctx context.Context, user string) error {
			return exec(ctx, fmt.Sprintf("REVOKE ALL PRIVILEGES, GRANT OPTION FROM '%s'@'127.0.0.1'; DROP USER '%[1]s'@'127.0.0.1'", user))
		},
		killUser: func(ctx context.Context, user string) (int, error) { return killMariaDBUser(ctx, admin, user) },
		refused: func(err error) bool {
			var me *mysql.MySQLError
			return errors.As(err, &me) && me.Number == 1045
		},
		revoked: func(err error) bool {
			var me *mysql.MySQLError
			return errors.As(err, &me) && (me.Number == 1142 || me.Number == 1143)
		},
	}, nil
}

// killMariaDBUser ends every session of user and waits (up to 5 s) until
// the processlist no longer shows those.
func killMariaDBUser(ctx context.Context, admin *sql.DB, user string) (int, error) {
	rows, err := admin.QueryContext(ctx, "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?", user)
	if err != nil {
		return 0, err
	}
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return 0, err
		}
		ids = append(ids, id)
	}
	rows.Close()
	for _, id := range ids {
		if _, err := admin.ExecContext(ctx, fmt.Sprintf("KILL CONNECTION %d", id)); err != nil {
			var me *mysql.MySQLError
			if !errors.As(err, &me) || me.Number != 1094 { // gone by itself meanwhile
				return 0, err
			}
		}
	}
	if len(ids) == 0 {
		return 0, nil
	}
	// Only the killed ids: the pool under load reconnects as the same user at once.
	list := strings.Trim(strings.Join(strings.Fields(fmt.Sprint(ids)), ","), "[]")
	for range 500 { // 5 s
		var n int
		if err := admin.QueryRowContext(ctx, "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ("+list+")").Scan(&n); err != nil {
			return 0, err
		}
		if n == 0 {
			return len(ids), nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return 0, fmt.Errorf("killed sessions of %s still listed 5 s after KILL", user)
}

// fileKey renders a DSN key whose value is a path: escaped, since the
// MySQL DSN is split at its last "/".
func fileKey(key, path string) string { return key + "=" + url.QueryEscape(path) }

// secretVolume lays out files as a Kubernetes secret volume does: each
// name is a symlink to ..data/name, and an update writes a new directory
// and swaps the ..data symlink to it in one rename.
type secretVolume struct {
	dir string
	n   int
}

func newSecretVolume(t *testing.T, files map[string]string) *secretVolume {
	v := &secretVolume{dir: t.TempDir()}
	v.update(t, files)
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(v.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return v
}

func (v *secretVolume) path(name string) string { return filepath.Join(v.dir, name) }

func (v *secretVolume) update(t *testing.T, files map[string]string) {
	t.Helper()
	v.n++
	version := fmt.Sprintf("..2025_01_01_00_00_%02d.%d", v.n, v.n)
	if err := os.Mkdir(filepath.Join(v.dir, version), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(v.dir, version, name), []byte(content+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(version, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

// secret returns a random password of the given tag, so that a check for
// "no password in the error" means something.
func secret(tag string) string {
	b := make([]byte, 8)
	rand.Read(b)
	return tag + "_" + hex.EncodeToString(b)
}

// loginWith tries one bare connection (no wrapper) as user with password.
func (l *authLab) loginWith(ctx context.Context, user, password string) error {
	db, err := sql.Open(l.bare, l.dsn(user, password))
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return db.PingContext(ctx)
}
