package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

var (
	errReapQueueFull = errors.New("resilientpg: reap queue full")
	errReapNoDriver  = errors.New("resilientpg: reaping needs pgx or go-sql-driver/mysql dialed by the wrapper")
	errReapGateDown  = errors.New("resilientpg: server down: reaping waits for it")
)

// reapClockSlack is how far a PostgreSQL backend_start may lie outside
// the connect's own window, on the client's clock: the server's clock is
// read at the reap, so this only has to absorb how much the two hosts'
// clocks drifted apart during the connection's life (NTP keeps that to
// milliseconds; an unsynchronised clock drifts tens of ms an hour). A
// mismatch only means a session is left alone.
const reapClockSlack = 250 * time.Millisecond

// openReapSession connects the reaper, through the same inner connector
// as the pool, with the same credentials. It does not take one of the
// pool's connections: the pool may be exhausted, or database/sql owns it
// (sql.Open gives the connector no *sql.DB), and a caller must never wait
// for the reaper.
func (c *Connector) openReapSession(ctx context.Context) (reapSession, error) {
	if c.gate.down.Load() {
		return nil, errReapGateDown
	}
	inner, d, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	if sc, ok := UnwrapConn(inner).(*stdlib.Conn); ok {
		return &pgReapSession{inner: inner, pc: sc.Conn()}, nil
	}
	if wc, ok := d.sock.(*wireConn); ok {
		return &mysqlReapSession{inner: inner, self: wc.id}, nil
	}
	inner.Close()
	return nil, errReapNoDriver
}

// pgReapSession reaps over a PostgreSQL connection. Its statements use the
// simple protocol, which every pooler and query mode accepts.
type pgReapSession struct {
	inner driver.Conn
	pc    *pgx.Conn
}

func (s *pgReapSession) Close() error { return s.inner.Close() }

// pgIdentitySQL reads, in one round trip, this session's own pid (a pooler
// in the path hands out pids that are not the server's), the server's
// clock, and what pg_stat_activity says of the orphan's pid. A role sees
// the client address of its own sessions only.
const pgIdentitySQL = `SELECT pg_backend_pid(), clock_timestamp(), a.pid IS NOT NULL, host(a.client_addr), a.client_port, a.backend_start, a.backend_start::text
FROM (VALUES (1)) AS v LEFT JOIN pg_stat_activity AS a ON a.pid = $1`

// pgTerminateSQL ends the session only if it is still the one checked:
// the same start, to the microsecond, and the same client port.
const pgTerminateSQL = `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND client_port = $2 AND backend_start::text = $3`

func (s *pgReapSession) reap(ctx context.Context, o orphan) (reapOutcome, error) {
	var (
		self      int64
		serverNow time.Time
		found     bool
		addr      *string
		port      *int32
		start     *time.Time
		startText *string
	)
	if o.id > math.MaxInt32 {
		return reapNotOurs, errPooler // no server pid is that large: PgBouncer makes up its own
	}
	t0 := time.Now()
	err := s.pc.QueryRow(ctx, pgIdentitySQL, pgx.QueryExecModeSimpleProtocol, int64(o.id)).
		Scan(&self, &serverNow, &found, &addr, &port, &start, &startText)
	rtt := time.Since(t0)
	if err != nil {
		return pgReapErr(err)
	}
	if uint32(self) != s.pc.PgConn().PID() {
		return reapNotOurs, errPooler // a pooler's pids are its own: nothing can be proved through it
	}
	if !found {
		return reapGone, nil
	}
	row := pgActivity{port: -1}
	if addr != nil {
		row.addr = *addr
	}
	if port != nil {
		row.port = int(*port)
	}
	if start != nil {
		// The server's clock on the client's: serverNow was read about
		// half a round trip after t0.
		offset := serverNow.Sub(t0.Round(0).Add(rtt / 2))
		row.start = start.Add(-offset)
	}
	if !o.matchesPg(row, rtt/2+reapClockSlack) {
		return reapNotOurs, nil
	}
	var ended bool
	err = s.pc.QueryRow(ctx, pgTerminateSQL, pgx.QueryExecModeSimpleProtocol, int64(o.id), int64(row.port), *startText).Scan(&ended)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return reapGone, nil // it ended between the two statements
	case err != nil:
		return pgReapErr(err)
	case !ended:
		return reapGone, nil
	}
	return reapEnded, nil
}

// errPooler explains a reap skipped because the reaper's own session
// reported another pid than its handshake.
var errPooler = errors.New("resilientpg: the server's pid differs from the handshake's: a pooler or proxy is in the path")

func pgReapErr(err error) (reapOutcome, error) {
	if code, ok := asPgError(err); ok && code == "42501" { // insufficient_privilege
		return reapDenied, err
	}
	return reapFailed, err
}

// pgActivity is what pg_stat_activity says of a pid; start is already on
// the client's clock. A session of another role shows no address.
type pgActivity struct {
	addr  string
	port  int // -1: not shown
	start time.Time
}

// matchesPg reports whether row is o's session: the client address and
// port the server saw are o's own, and the backend started while o was
// connecting, within slack.
func (o orphan) matchesPg(row pgActivity, slack time.Duration) bool {
	ip, err := netip.ParseAddr(row.addr)
	if err != nil || ip.Unmap() != o.local.Addr() || row.port != int(o.local.Port()) || row.start.IsZero() {
		return false
	}
	return !row.start.Before(o.start.Add(-slack)) && !row.start.After(o.born.Add(slack))
}

// mysqlReapSession reaps over a MySQL or MariaDB connection; self is its
// own connection id from the greeting. Ids are numbers the wrapper parsed,
// written into the statements, which the text protocol runs as they are.
type mysqlReapSession struct {
	inner driver.Conn
	self  uint32
}

func (s *mysqlReapSession) Close() error { return s.inner.Close() }

func (s *mysqlReapSession) reap(ctx context.Context, o orphan) (reapOutcome, error) {
	q, ok := s.inner.(driver.QueryerContext)
	x, ok2 := s.inner.(driver.ExecerContext)
	if !ok || !ok2 {
		return reapFailed, errReapNoDriver
	}
	id := strconv.FormatUint(uint64(o.id), 10)
	self, host, err := mysqlIdentity(ctx, q, id)
	if err != nil {
		return mysqlReapErr(err)
	}
	if s.self == 0 || self != uint64(s.self) {
		return reapNotOurs, errPooler // a proxy's ids are its own
	}
	if host == nil {
		return reapGone, nil
	}
	if !o.matchesMySQLHost(ctx, *host, net.DefaultResolver.LookupNetIP) {
		return reapNotOurs, nil
	}
	// Ids are never reused while the server runs, so the thread checked is
	// the thread killed, or it has ended.
	if _, err := x.ExecContext(ctx, "KILL CONNECTION "+id, nil); err != nil {
		if n, ok := asMySQLNumber(err); ok && n == 1094 { // ER_NO_SUCH_THREAD
			return reapGone, nil
		}
		return mysqlReapErr(err)
	}
	return reapEnded, nil
}

// mysqlIdentity reads this session's own id and the HOST ("address:port")
// the server shows for thread id, nil when there is no such thread.
func mysqlIdentity(ctx context.Context, q driver.QueryerContext, id string) (uint64, *string, error) {
	rows, err := q.QueryContext(ctx, "SELECT CONNECTION_ID(), (SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = "+id+")", nil)
	if err != nil {
		return 0, nil, err
	}
	defer rows.Close()
	v := make([]driver.Value, 2)
	if err := rows.Next(v); err != nil {
		if err == io.EOF {
			err = errors.New("resilientpg: no row")
		}
		return 0, nil, err
	}
	self, err := strconv.ParseUint(valueString(v[0]), 10, 64)
	if err != nil {
		return 0, nil, fmt.Errorf("resilientpg: CONNECTION_ID() = %v: %w", v[0], err)
	}
	if v[1] == nil {
		return self, nil, nil
	}
	host := valueString(v[1])
	return self, &host, nil
}

func valueString(v driver.Value) string {
	switch x := v.(type) {
	case []byte:
		return string(x)
	case string:
		return x
	case int64:
		return strconv.FormatInt(x, 10)
	case uint64:
		return strconv.FormatUint(x, 10)
	}
	return fmt.Sprint(v)
}

func mysqlReapErr(err error) (reapOutcome, error) {
	if n, ok := asMySQLNumber(err); ok && (n == 1095 || n == 1227) { // ER_KILL_DENIED_ERROR, ER_SPECIFIC_ACCESS_DENIED
		return reapDenied, err
	}
	return reapFailed, err
}

// matchesMySQLHost reports whether a processlist HOST is o's address. The
// server shows "address:port", with "localhost" for a loopback client, or
// the client's host name when it resolves names; a name counts only if it
// resolves to o's address. A HOST without a port is a Unix socket's.
func (o orphan) matchesMySQLHost(ctx context.Context, host string, resolve func(context.Context, string, string) ([]netip.Addr, error)) bool {
	i := strings.LastIndexByte(host, ':')
	if i < 0 {
		return false
	}
	port, err := strconv.ParseUint(host[i+1:], 10, 16)
	if err != nil || uint16(port) != o.local.Port() {
		return false
	}
	name := strings.TrimSuffix(strings.TrimPrefix(host[:i], "["), "]")
	if ip, err := netip.ParseAddr(name); err == nil {
		return ip.Unmap() == o.local.Addr()
	}
	if name == "localhost" {
		return o.local.Addr().IsLoopback()
	}
	if resolve == nil {
		return false
	}
	ips, err := resolve(ctx, "ip", name)
	if err != nil {
		return false
	}
	for _, ip := range ips {
		if ip.Unmap() == o.local.Addr() {
			return true
		}
	}
	return false
}
