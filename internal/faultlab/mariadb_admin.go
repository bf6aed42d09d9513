package faultlab

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/go-sql-driver/mysql"
)

// erNoSuchThread is MariaDB's "Unknown thread id" for KILL: the session
// ended on its own in the meantime.
const erNoSuchThread = 1094

// adminDB opens a one-connection pool as user. lock_wait_timeout is cut
// from a year to 10 s so that SET GLOBAL read_only, which waits for other
// sessions' locks, cannot hang a test.
func (m *MariaDB) adminDB(user string) (*sql.DB, error) {
	cfg := mysql.NewConfig()
	cfg.User = user
	cfg.Net = "tcp"
	cfg.Addr = m.Addr()
	if m.ns != nil {
		cfg.Net, cfg.Addr = "unix", m.socketPath()
	}
	cfg.Timeout = 5 * time.Second
	cfg.ReadTimeout = 30 * time.Second
	cfg.WriteTimeout = 30 * time.Second
	cfg.MultiStatements = true
	cfg.Params = map[string]string{"lock_wait_timeout": "10"}
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		return nil, fmt.Errorf("faultlab: admin connector: %w", err)
	}
	db := sql.OpenDB(connector)
	db.SetMaxOpenConns(1)
	return db, nil
}

// adminHost is the host part of the admin account: the socket's
// "localhost" inside a namespace, 127.0.0.1 otherwise.
func (m *MariaDB) adminHost() string {
	if m.ns != nil {
		return "localhost"
	}
	return loopbackHost
}

// ping opens and closes one connection as root, proving the server is up
// and the account clients use can log in.
func (m *MariaDB) ping(ctx context.Context) error {
	db, err := m.adminDB("root")
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return db.PingContext(ctx)
}

// Exec runs sql (several statements separated by ";" are allowed) on a
// fresh connection with every privilege. Without a ctx deadline it is bounded to 30 s.
func (m *MariaDB) Exec(ctx context.Context, sql string) error {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	db, err := m.adminDB(m.adminUser)
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, sql); err != nil {
		return fmt.Errorf("faultlab: exec %q: %w", sql, err)
	}
	return nil
}

// KillSessions runs KILL CONNECTION on every client connection except the
// admin one it uses itself, waits (up to 10 s) until they have left the
// process list, and returns how many it killed.
func (m *MariaDB) KillSessions(ctx context.Context) (int, error) {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	db, err := m.adminDB(m.adminUser)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	conn, err := db.Conn(ctx) // pinned, so CONNECTION_ID() is the one we spare
	if err != nil {
		return 0, fmt.Errorf("faultlab: admin connect: %w", err)
	}
	defer conn.Close()

	ids, err := m.clientIDs(ctx, conn)
	if err != nil {
		return 0, err
	}
	killed := make([]string, 0, len(ids))
	for _, id := range ids {
		_, err := conn.ExecContext(ctx, "KILL CONNECTION "+id)
		var myErr *mysql.MySQLError
		if errors.As(err, &myErr) && myErr.Number == erNoSuchThread {
			continue
		}
		if err != nil {
			return len(killed), fmt.Errorf("faultlab: kill %s: %w", id, err)
		}
		killed = append(killed, id)
	}
	if len(killed) == 0 {
		return 0, nil
	}
	// KILL only flags the thread; wait until it is really gone so callers
	// can rely on the connection being dead when this returns.
	err = poll(ctx, 200, 50*time.Millisecond, 10*time.Second, "wait for killed sessions to exit",
		func(ctx context.Context) error {
			var left int
			q := "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN (" + strings.Join(killed, ",") + ")"
			if err := conn.QueryRowContext(ctx, q).Scan(&left); err != nil {
				return err
			}
			if left > 0 {
				return fmt.Errorf("%d killed sessions still listed", left)
			}
			return nil
		})
	return len(killed), err
}

// clientIDs lists the connection ids of client sessions other than conn's
// own; server-internal threads are skipped since killing them is refused.
func (m *MariaDB) clientIDs(ctx context.Context, conn *sql.Conn) ([]string, error) {
	rows, err := conn.QueryContext(ctx, `SELECT ID FROM information_schema.PROCESSLIST
		WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Killed')
		AND USER NOT IN ('system user', 'event_scheduler')`)
	if err != nil {
		return nil, fmt.Errorf("faultlab: list sessions: %w", err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("faultlab: list sessions: %w", err)
		}
		ids = append(ids, strconv.FormatInt(id, 10))
	}
	return ids, rows.Err()
}

// SetReadOnly sets the global read_only flag. It is checked on every
// statement, so open sessions are affected at once, root's included (see
// StartMariaDB): writes then fail with error 1290
// (ER_OPTION_PREVENTS_STATEMENT, "running with the --read-only option").
// A transaction that already wrote is not waited for: its COMMIT fails
// with 1290 too. Turning it on does wait for statements in progress and
// for LOCK TABLES holders, at most the admin session's 10 s
// lock_wait_timeout. The flag does not survive a restart.
func (m *MariaDB) SetReadOnly(ctx context.Context, on bool) error {
	v := "OFF"
	if on {
		v = "ON"
	}
	return m.Exec(ctx, "SET GLOBAL read_only = "+v)
}
