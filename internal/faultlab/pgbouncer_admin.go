package faultlab

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// adminConnect opens a session on PgBouncer's admin console, the
// "pgbouncer" database. The console speaks only the simple query
// protocol: pgx's default extended protocol gets "unsupported pkt type".
func (b *PgBouncer) adminConnect(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(b.DSN("pgbouncer") + "&connect_timeout=5&default_query_exec_mode=simple_protocol")
	if err != nil {
		return nil, err
	}
	cfg.Password = b.adminPwd
	return pgx.ConnectConfig(ctx, cfg)
}

// Admin runs one admin console command: PAUSE [db], RESUME [db],
// RECONNECT [db], KILL db, SUSPEND, SHUTDOWN, RELOAD, SET key = value.
// PAUSE returns once every server connection is released (session mode:
// once clients disconnect; transaction mode: once transactions end).
// SHUTDOWN makes pgbouncer exit: its clients see EOF. Without a ctx
// deadline it is bounded to 30 s.
func (b *PgBouncer) Admin(ctx context.Context, command string) error {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	conn, err := b.adminConnect(ctx)
	if err != nil {
		return fmt.Errorf("faultlab: pgbouncer admin connect: %w", err)
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, command)
	if err != nil && strings.HasPrefix(strings.ToUpper(strings.TrimSpace(command)), "SHUTDOWN") {
		return nil // pgbouncer exits without answering
	}
	if err != nil {
		return fmt.Errorf("faultlab: pgbouncer %q: %w", command, err)
	}
	return nil
}

// Set changes a setting at run time, e.g. Set(ctx, "server_login_retry",
// "2") or Set(ctx, "query_wait_timeout", "1"). It lasts until a restart,
// which reads pgbouncer.ini again.
func (b *PgBouncer) Set(ctx context.Context, key, value string) error {
	return b.Admin(ctx, fmt.Sprintf("SET %s = '%s'", key, strings.ReplaceAll(value, "'", "''")))
}

// Show runs SHOW what (POOLS, CLIENTS, SERVERS, CONFIG, STATS, VERSION,
// ...) and returns its rows as column name to text value.
func (b *PgBouncer) Show(ctx context.Context, what string) ([]map[string]string, error) {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	conn, err := b.adminConnect(ctx)
	if err != nil {
		return nil, fmt.Errorf("faultlab: pgbouncer admin connect: %w", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, "SHOW "+what)
	if err != nil {
		return nil, fmt.Errorf("faultlab: pgbouncer SHOW %s: %w", what, err)
	}
	defer rows.Close()
	var out []map[string]string
	fields := rows.FieldDescriptions()
	for rows.Next() {
		row := make(map[string]string, len(fields))
		for i, raw := range rows.RawValues() {
			row[fields[i].Name] = string(raw)
		}
		out = append(out, row)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("faultlab: pgbouncer SHOW %s: %w", what, err)
	}
	return out, nil
}
