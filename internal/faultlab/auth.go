package faultlab

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// pgHBAPasswords is the pg_hba.conf RequirePasswords writes. The superuser
// keeps trust, on the socket and on TCP, so that faultlab's own admin
// connections (Exec, KillSessions, SetReadOnly) need no password; every
// other role must prove its password with SCRAM over TCP.
const pgHBAPasswords = `# Written by faultlab.RequirePasswords.
local all all                   trust
host  all postgres 127.0.0.1/32 trust
host  all all      127.0.0.1/32 scram-sha-256
`

// pgCanaryRole is the role RequirePasswords logs in as, without a
// password, to see the new pg_hba.conf in force.
const pgCanaryRole = "faultlab_canary"

// RequirePasswords turns on real password authentication: every role but
// the superuser "postgres" must then log in over TCP with scram-sha-256
// (PostgreSQL 15's default password_encryption, so ALTER ROLE ... PASSWORD
// stores a SCRAM verifier). It rewrites pg_hba.conf, reloads, and returns
// once a login without a password is refused (SQLSTATE 28P01), bounded by
// ctx and 10 s. The file survives restarts.
func (p *Postgres) RequirePasswords(ctx context.Context) error {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	path := filepath.Join(p.dataDir(), "pg_hba.conf")
	if err := os.WriteFile(path, []byte(pgHBAPasswords), 0o600); err != nil {
		return fmt.Errorf("faultlab: write pg_hba.conf: %w", err)
	}
	if err := p.user.chownTree(path); err != nil {
		return fmt.Errorf("faultlab: chown pg_hba.conf: %w", err)
	}
	if err := p.Exec(ctx, "DROP ROLE IF EXISTS "+pgCanaryRole); err != nil {
		return err
	}
	if err := p.Exec(ctx, "CREATE ROLE "+pgCanaryRole+" LOGIN"); err != nil {
		return err
	}
	if err := p.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return err
	}
	// pg_reload_conf only signals the postmaster: a refused login proves
	// the new rules are loaded.
	err := poll(ctx, 100, 20*time.Millisecond, 10*time.Second, "wait for pg_hba.conf to require passwords",
		func(ctx context.Context) error {
			conn, err := pgx.Connect(ctx, p.DSNFor(pgCanaryRole, "", "postgres")+"&connect_timeout=5")
			if err == nil {
				conn.Close(context.Background())
				return errors.New("a login without a password still succeeds")
			}
			var pe *pgconn.PgError
			if errors.As(err, &pe) && pe.Code == "28P01" {
				return nil
			}
			return err
		})
	if err != nil {
		return withLog(err, p.logPath())
	}
	return p.Exec(ctx, "DROP ROLE "+pgCanaryRole)
}

// DSNFor returns a pgx/libpq URL for database db as user with password
// ("" for none), e.g. for a role made after RequirePasswords.
func (p *Postgres) DSNFor(user, password, db string) string {
	u := url.URL{Scheme: "postgres", Host: p.Addr(), Path: "/" + db, RawQuery: "sslmode=disable"}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	return u.String()
}

// DSNFor returns a go-sql-driver/mysql DSN for database db as
// user@127.0.0.1 with password ("" for none). MariaDB always checks
// passwords, so an account made with CREATE USER ... IDENTIFIED BY needs
// no server setting.
func (m *MariaDB) DSNFor(user, password, db string) string {
	cred := user
	if password != "" {
		cred += ":" + password
	}
	return cred + "@tcp(" + m.Addr() + ")/" + db
}
