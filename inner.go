package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"net"
	"reflect"
	"strconv"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// The inner connectors of the registered drivers: pgx v5 stdlib for
// "resilientpg", go-sql-driver/mysql for "resilientmysql", each built from
// its DSN with the wrapper's hooks (dialer, credentials, target check) set.

// pgConnector builds the pgx connector. Exactly one layer pings: the
// wrapper's checkout policy, so pgx's own checkout ping is switched off.
func pgConnector(c *Connector, dsn string, poolSizing bool) (driver.Connector, error) {
	c.target = target{system: "postgresql"}
	cfg, err := parsePgConfig(dsn, &c.opts, poolSizing)
	if err != nil {
		// A name made by stdlib.RegisterConnConfig is not a DSN; pgx's own
		// driver knows it. It cannot carry resilient_ keys.
		if isRegisteredPgxName(dsn) {
			if err := checkOptions(&c.opts, poolSizing); err != nil {
				return nil, err
			}
			return stdlib.GetDefaultDriver().(driver.DriverContext).OpenConnector(dsn)
		}
		return nil, err
	}
	c.target.address, c.target.port = cfg.Host, int(cfg.Port)
	c.gate.fleet = fleetFor(pgFleetKey(&cfg.Config))
	c.writable = writableTarget(cfg)
	if v := cfg.ValidateConnect; v != nil {
		cfg.ValidateConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
			if err := v(ctx, pc); err != nil {
				return &targetMismatchError{err}
			}
			return nil
		}
	}
	if cfg.ConnectTimeout == 0 && multiHost(&cfg.Config) {
		// pgx spends a connect's whole deadline on a black-holed first
		// host and never tries the next; a bound per host lets a
		// multi-host DSN reach its second host (connect_timeout in the
		// DSN or PGCONNECT_TIMEOUT overrides it).
		cfg.ConnectTimeout = defaultHostConnectTimeout
	}
	g := c.gate
	// The DSN's config dials with pgconn's default, a zero net.Dialer:
	// the wrapper's has the keepalive and user timeout.
	dial := dialer(&c.opts).DialContext
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if g.sideDialsBlocked(ctx) {
			return nil, errSideDialSkipped
		}
		return dial(ctx, network, addr)
	}
	c.creds = newCredSource(&c.opts)
	return stdlib.GetConnector(*cfg, stdlib.OptionShouldPing(neverPing),
		stdlib.OptionBeforeConnect(pgBeforeConnect(c, dsn))), nil
}

// multiHost reports whether cfg names more than one host: pgconn also
// lists a plain-text fallback of the same host for sslmode=prefer, which
// does not count.
func multiHost(cfg *pgconn.Config) bool {
	for _, fb := range cfg.Fallbacks {
		if fb.Host != cfg.Host || fb.Port != cfg.Port {
			return true
		}
	}
	return false
}

// defaultHostConnectTimeout bounds each host's connect attempt of a
// multi-host DSN without connect_timeout: a healthy connect takes
// milliseconds, a TLS login across regions a few hundred, and 2 s leaves
// room to try a second host within a typical 5 s request deadline.
const defaultHostConnectTimeout = 2 * time.Second

// targetMismatchError marks a connect that reached a live server of the
// wrong role for target_session_attrs (a standby when a primary is asked
// for): during a failover the new primary may appear any moment, so the
// connect gate probes again soon rather than backing off.
type targetMismatchError struct{ err error }

func (e *targetMismatchError) Error() string { return e.err.Error() }
func (e *targetMismatchError) Unwrap() error { return e.err }

// errSideDialSkipped is what pgx's cancel request gets while the server is
// known down; pgx ignores cancel request errors.
var errSideDialSkipped = errors.New("resilientpg: server down: cancel request not sent")

// writableTarget reports whether the DSN asked for a server that accepts
// writes (target_session_attrs=read-write or primary). pgx keeps that only
// as a validation function, so the function is compared.
func writableTarget(cfg *pgx.ConnConfig) bool {
	if cfg.ValidateConnect == nil {
		return false
	}
	f := reflect.ValueOf(cfg.ValidateConnect).Pointer()
	return f == reflect.ValueOf(pgconn.ValidateConnectTargetSessionAttrsReadWrite).Pointer() ||
		f == reflect.ValueOf(pgconn.ValidateConnectTargetSessionAttrsPrimary).Pointer()
}

// parsePgConfig lets pgx parse its own grammar (URL or keyword/value,
// multi-host, environment defaults); it leaves unknown keys in
// RuntimeParams, where the wrapper claims its own.
func parsePgConfig(dsn string, o *Options, poolSizing bool) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err // pgconn's ParseConfigError redacts the password
	}
	if err := claimKeys(cfg.RuntimeParams, o, poolSizing); err != nil {
		return nil, err
	}
	return cfg, nil
}

func neverPing(context.Context, stdlib.ShouldPingParams) bool { return false }

func isRegisteredPgxName(dsn string) bool {
	const prefix = "registeredConnConfig"
	return len(dsn) > len(prefix) && dsn[:len(prefix)] == prefix
}

// mysqlConnector builds the go-sql-driver/mysql connector.
// Its writable-target answer is false: mysql's own rejectReadOnly=true
// handles a demoted primary inside the driver.
func mysqlConnector(c *Connector, dsn string, poolSizing bool) (driver.Connector, error) {
	c.target = target{system: "mysql"}
	cfg, err := parseMySQLConfig(dsn, &c.opts, poolSizing)
	if err != nil {
		return nil, err
	}
	c.gate.fleet = fleetFor("mysql " + cfg.Net + " " + cfg.Addr)
	if host, port, err := net.SplitHostPort(cfg.Addr); err == nil && cfg.Net == "tcp" {
		c.target.address = host
		c.target.port, _ = strconv.Atoi(port)
	}
	// The driver's own log lines join the connector's events, or go
	// nowhere when logging is off; by default the driver prints them.
	cfg.Logger = mysqlLogger{c}
	// The driver keeps its socket to itself; a dial hook lends it to the
	// checkout's peek. A network registered with mysql.RegisterDialContext
	// keeps its own dialer (and no peek): it is not a plain socket.
	switch {
	case cfg.DialFunc != nil:
		cfg.DialFunc = captureDial(cfg.DialFunc)
	case cfg.Net == "tcp" || cfg.Net == "tcp4" || cfg.Net == "tcp6" || cfg.Net == "unix":
		cfg.DialFunc = captureDial(dialer(&c.opts).DialContext)
	case c.opts.tcpChanged():
		return nil, c.opts.tcpUnapplicable("the default with a network registered by mysql.RegisterDialContext (" + cfg.Net + "), which dials with its own dialer")
	}
	c.captureSock = cfg.DialFunc != nil
	c.plaintext = cfg.TLS == nil
	if c.creds = newCredSource(&c.opts); c.creds != nil {
		if err := cfg.Apply(mysql.BeforeConnect(mysqlBeforeConnect(c))); err != nil {
			return nil, err
		}
	}
	return mysql.NewConnector(cfg)
}

// parseMySQLConfig uses the driver's own parser, whose Params map holds the
// keys it does not know (it would send them as SET statements).
func parseMySQLConfig(dsn string, o *Options, poolSizing bool) (*mysql.Config, error) {
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		return nil, err
	}
	if err := claimKeys(cfg.Params, o, poolSizing); err != nil {
		return nil, err
	}
	return cfg, nil
}
