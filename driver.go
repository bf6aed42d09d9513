// Package resilientpg keeps database/sql connection pools healthy when
// pooled connections die while idle or in flight: cloud idle timeouts,
// NAT and load-balancer flow drops, server restarts and failovers,
// pg_terminate_backend, wait_timeout.
//
// It is a driver.Connector decorator, registered as "resilientpg" (pgx v5
// stdlib inside) and "resilientmysql" (go-sql-driver/mysql inside), and a
// drop-in: the DSN is the inner driver's, plus resilient_ keys that are
// stripped before the inner driver sees them and validated strictly.
//
//	db, err := sql.Open("resilientpg", "postgres://app@db:5432/app?resilient_max_age=30m")
//	db, err := sql.Open("resilientmysql", "app:pw@tcp(db:3306)/app?resilient_ping_timeout=500ms")
//	db, err := resilientpg.Open("resilientpg", dsn) // also applies resilient_max_open_conns
//	c, err := resilientpg.NewConnector(anyConnector, resilientpg.DefaultOptions())
//
// # The contract
//
// At checkout of a used connection (driver.SessionResetter), cheapest first:
// a connection past its max age or idle past resilient_max_idle_time is
// discarded without I/O; a non-blocking peek at the socket discards one the
// server has already closed, even if it was used a moment ago; the inner
// driver's own reset runs; then, if resilient_ping says one is due, a
// round-trip ping bounded by the smaller of the caller's deadline and
// resilient_ping_timeout. Every discard returns an error wrapping
// driver.ErrBadConn, so database/sql takes another connection (up to three
// attempts, the last on a new connection): the caller never sees a stale
// connection that the checks can detect. Exactly one layer pings: pgx's own
// checkout ping is switched off.
//
// At return (driver.Validator), a connection marked bad, past its max age,
// closed, or still inside a transaction is closed instead of pooled.
//
// Each connection draws its own max age at connect, between
// resilient_max_age minus the jitter and resilient_max_age, so connections
// opened together are not all replaced at once. db.SetConnMaxLifetime still
// applies on top; whichever is shorter wins.
//
// When a statement fails, a disconnect marks its connection bad, and a
// server-wide event (crash, shutdown, restart, a demoted primary) retires
// every older connection. The wrapper lets database/sql run a statement
// again only when it provably did not execute: nothing was sent, or a
// read-only server rejected it outside a transaction; a mid-flight
// disconnect is retried only for contexts marked with WithIdempotent.
// While the server is down, one probe connect per pool is in flight, with
// capped, jittered backoff, and other requests wait for it.
//
// # Reaching the driver's connection
//
// Inside sql.Conn.Raw, UnwrapConn returns the inner driver's connection,
// for pgx's CopyFrom or LISTEN/NOTIFY:
//
//	err := sqlConn.Raw(func(dc any) error {
//		pgxConn := resilientpg.UnwrapConn(dc).(*stdlib.Conn).Conn()
//		_, err := pgxConn.CopyFrom(ctx, pgx.Identifier{"items"}, []string{"id"}, pgx.CopyFromRows(rows))
//		return err
//	})
package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"slices"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"
)

// Driver is the wrapping driver.Driver. It implements driver.DriverContext,
// so sql.Open parses the DSN once, in OpenConnector, and fails fast on a bad
// key.
type Driver struct {
	name  string
	inner driver.Driver
	// build parses dsn into c's inner connector, claiming resilient_ keys
	// into c.opts and noting c.writable and c.target; the inner connector's
	// hooks may keep c (the dial gate, the mysql logger).
	build func(c *Connector, dsn string, poolSizing bool) (driver.Connector, error)
	// owner is the connector this copy of the driver belongs to: each
	// Connector hands database/sql a Driver of its own, so that StatsOf can
	// find the connector behind a *sql.DB through db.Driver(). Nil for the
	// registered drivers.
	owner *Connector
}

var (
	_ driver.Driver        = (*Driver)(nil)
	_ driver.DriverContext = (*Driver)(nil)
)

var (
	pgDriver    = &Driver{name: "resilientpg", inner: stdlib.GetDefaultDriver(), build: pgConnector}
	mysqlDriver = &Driver{name: "resilientmysql", inner: &mysql.MySQLDriver{}, build: mysqlConnector}
)

func init() { register() }

// register is guarded, as pgx's is, so that two copies of this package
// (vendored and not, say) can coexist in one binary: sql.Register panics on
// a name taken twice.
func register() {
	for _, d := range []*Driver{pgDriver, mysqlDriver} {
		if !slices.Contains(sql.Drivers(), d.name) {
			sql.Register(d.name, d)
		}
	}
}

// Open opens one connection. database/sql never calls it, because the
// driver implements DriverContext; it exists for driver.Driver.
func (d *Driver) Open(dsn string) (driver.Conn, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	return c.Connect(context.Background())
}

// OpenConnector parses dsn once, claiming and validating the resilient_
// keys, and returns the connector sql.Open uses for every connection.
func (d *Driver) OpenConnector(dsn string) (driver.Connector, error) {
	return d.connector(dsn, DefaultOptions(), false)
}

// Unwrap returns the inner driver, for code that detects the SQL dialect
// from db.Driver().
func (d *Driver) Unwrap() driver.Driver { return d.inner }

func (d *Driver) connector(dsn string, o Options, poolSizing bool) (*Connector, error) {
	c := &Connector{opts: o, gate: &dialGate{}}
	inner, err := d.build(c, dsn, poolSizing)
	if err != nil {
		return nil, err
	}
	c.ownsPgx = d.inner == pgDriver.inner && d.name == pgDriver.name
	c.init(inner, d)
	return c, nil
}

// genericDriver wraps a driver whose DSN grammar the wrapper does not know:
// the DSN goes through untouched, with fixed options.
func genericDriver(inner driver.Driver, fixed Options) *Driver {
	return &Driver{name: "resilientpg(generic)", inner: inner,
		build: func(c *Connector, dsn string, poolSizing bool) (driver.Connector, error) {
			if key, ok := genericDSNKey(dsn); ok {
				return nil, &ConfigError{Key: key, Value: "(in the DSN)",
					Allowed: "resilient_ keys only in resilientpg and resilientmysql DSNs; set Options fields for other drivers"}
			}
			c.opts = fixed
			c.target = target{system: "other_sql"}
			if dc, ok := inner.(driver.DriverContext); ok {
				return dc.OpenConnector(dsn)
			}
			return dsnConnector{dsn: dsn, drv: inner}, nil
		}}
}

// dsnConnector is database/sql's own adapter for a driver without
// DriverContext.
type dsnConnector struct {
	dsn string
	drv driver.Driver
}

func (t dsnConnector) Connect(context.Context) (driver.Conn, error) { return t.drv.Open(t.dsn) }
func (t dsnConnector) Driver() driver.Driver                        { return t.drv }
