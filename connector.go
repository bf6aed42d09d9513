package resilientpg

import (
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"reflect"
	"sync/atomic"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"
)

// Connector is a driver.Connector that wraps another and keeps the
// connections it makes healthy. It is safe for concurrent use; its options
// are fixed when it is made.
type Connector struct {
	inner          driver.Connector
	drv            *Driver // this connector's own copy, owner set
	opts           Options
	writable       bool   // the DSN asks for a writable server
	target         target // the server, for log records
	rejectReadOnly bool   // RejectReadOnly resolved against the DSN
	ownsPgx        bool   // inner is a pgx connector this package built
	captureSock    bool   // the inner driver's dial hook hands its socket back (mysql)
	plaintext      bool   // with captureSock: the socket carries no TLS
	db             *sql.DB
	creds          *credSource // Options.Credentials or the files; nil: the DSN's own (and, for pgx, its environment)

	gen    atomic.Uint64 // bumped by invalidate; a conn of an older one is discarded
	lostAt atomic.Int64  // UnixNano of the last statement that lost its connection; see peekAfterIdle
	endAt  atomic.Int64  // UnixNano of the last statement the server ended (shutdown, pg_terminate_backend); see lossPeekWindow
	gate   *dialGate     // shared with the inner connector's dial hook, if it has one

	stats  counters
	ev     events
	track  tracker
	mon    monitor
	reap   reaper
	connID atomic.Int64 // the last connection id handed out
}

var _ driver.Connector = (*Connector)(nil)

// init finishes a connector whose options are final.
func (c *Connector) init(inner driver.Connector, d *Driver) {
	c.inner = inner
	own := *d
	own.owner = c
	c.drv = &own
	switch c.opts.RejectReadOnly {
	case ReadOnlyReject:
		c.rejectReadOnly = true
	case ReadOnlyAuto:
		c.rejectReadOnly = c.writable
	}
	c.gate.bo = backoff{initial: c.opts.ConnectBackoff, max: c.opts.ConnectBackoffMax}
	c.gate.interval = c.opts.ProbeInterval
	c.gate.c = c
	c.ev.init(&c.opts, c.target)
	c.track.epoch = time.Now()
	c.reap.c = c
	if c.opts.Reap {
		c.reap.open = c.openReapSession
	}
}

// dialed is what a dial learnt besides the connection.
type dialed struct {
	sock    net.Conn  // the socket, when the driver hides it; else nil
	expires time.Time // when the credentials it logged in with expire; zero: never
	start   time.Time // when the connect began
}

// wrap wraps a new inner connection; its max age is drawn here, and ends
// no later than its credentials' Expires, so that a pool on short-lived
// tokens rolls over to new ones as they are issued.
func (c *Connector) wrap(inner driver.Conn, d dialed) *conn {
	now := time.Now()
	w := newConn(c, inner, now)
	w.life = w.life.capAt(now, d.expires, c.opts.MaxAgeJitter)
	w.wire, _ = d.sock.(*wireConn)
	if sock := d.sock; sock != nil && w.sock == nil {
		w.sock = newSockCheck(sock)
		if w.sock != nil {
			w.sock.plaintext, w.sock.mysql = c.plaintext, true
		}
	}
	if c.opts.Reap {
		w.sess = identify(w, d, now)
	}
	c.stats.connsOpened.Add(1)
	c.track.add(w)
	if c.opts.LeakThreshold > 0 {
		c.startMonitor(false)
	}
	return w
}

// invalidate retires every connection of generation gen: each is
// discarded at its next checkout or return, without a ping (SQLAlchemy's
// pool-wide invalidation). It moves the generation on only from gen, so
// that one event seen by many connections at once (every session of a
// crashed server reports it), or by a connection and then the gate, counts
// once; it reports whether it did.
func (c *Connector) invalidate(gen uint64, cause InvalidationCause) bool {
	if !c.gen.CompareAndSwap(gen, gen+1) {
		return false // already retired, by another report of the same event
	}
	c.stats.invalidations[cause].Add(1)
	c.ev.emit(evPoolInvalidated, slog.LevelWarn, "resilientpg: every pooled connection retired", slog.String("cause", cause.String()))
	return true
}

// lost records that a statement lost its connection at now: the server may
// be gone, so the next connect probes for the others, and for
// lossPeekWindow checkout peeks at every connection, however briefly idle.
// ended says the server ended the session itself (ClassShutdown): then,
// under the idle ping policy, checkout pings every connection for
// lossPeekWindow too (see lossPeekWindow).
func (c *Connector) lost(now time.Time, ended bool) {
	c.lostAt.Store(now.UnixNano())
	if ended {
		c.endAt.Store(now.UnixNano())
	}
	c.gate.suspect()
}

// Driver returns the wrapping driver: a copy of the registered one that
// belongs to this connector (see StatsOf).
func (c *Connector) Driver() driver.Driver { return c.drv }

// Close stops the connector's background goroutines, if any run, and
// closes the inner connector if it has a Close method; database/sql calls
// it from DB.Close.
func (c *Connector) Close() error {
	c.stopMonitor()
	c.reap.close()
	if cl, ok := c.inner.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// Options returns the options the connector was made with.
func (c *Connector) Options() Options { return c.opts }

// NewConnector wraps inner, which is one of:
//   - a driver.Connector: wrapped as it is;
//   - a driver.Driver, opened with opts' DSN: pgx's stdlib driver and
//     go-sql-driver/mysql's are parsed with their own parsers, so resilient_
//     keys in the DSN are claimed on top of opts (as with sql.Open); any
//     other driver gets the DSN as it is, and a resilient_ key in it is an
//     error, since it cannot be stripped from a grammar the wrapper does not
//     know.
//
// The pool-size options are rejected here, because only the owner of the
// *sql.DB can apply them: use OpenDB for those.
func NewConnector(inner any, opts Options, dsn ...string) (*Connector, error) {
	return newConnector(inner, opts, dsn, false)
}

// OpenDB is NewConnector followed by sql.OpenDB, and it applies
// Options.MaxOpenConns and Options.MaxIdleConns to the *sql.DB.
func OpenDB(inner any, opts Options, dsn ...string) (*sql.DB, error) {
	c, err := newConnector(inner, opts, dsn, true)
	if err != nil {
		return nil, err
	}
	return openDB(c), nil
}

// Open is sql.Open for the wrapper's registered drivers ("resilientpg",
// "resilientmysql"), and it applies the resilient_max_open_conns and
// resilient_max_idle_conns keys to the *sql.DB.
func Open(driverName, dsn string) (*sql.DB, error) {
	var d *Driver
	switch driverName {
	case pgDriver.name:
		d = pgDriver
	case mysqlDriver.name:
		d = mysqlDriver
	default:
		return nil, fmt.Errorf("resilientpg: Open: unknown driver %q, want %q or %q", driverName, pgDriver.name, mysqlDriver.name)
	}
	c, err := d.connector(dsn, DefaultOptions(), true)
	if err != nil {
		return nil, err
	}
	return openDB(c), nil
}

func openDB(c *Connector) *sql.DB {
	db := sql.OpenDB(c)
	c.db = db
	if c.ev.enabled(slog.LevelWarn) {
		c.watchExhaustion()
	}
	if c.opts.MaxOpenConns != Unset {
		db.SetMaxOpenConns(c.opts.MaxOpenConns)
	}
	if c.opts.MaxIdleConns != Unset {
		db.SetMaxIdleConns(c.opts.MaxIdleConns)
	}
	return db
}

func newConnector(inner any, opts Options, dsns []string, poolSizing bool) (*Connector, error) {
	if len(dsns) > 1 {
		return nil, errors.New("resilientpg: NewConnector: at most one DSN")
	}
	dsn := ""
	if len(dsns) == 1 {
		dsn = dsns[0]
	}
	switch in := inner.(type) {
	case driver.Connector:
		if dsn != "" {
			return nil, errors.New("resilientpg: NewConnector: a DSN goes with a driver.Driver, not a driver.Connector")
		}
		if err := checkOptions(&opts, poolSizing); err != nil {
			return nil, err
		}
		c := &Connector{opts: opts, gate: &dialGate{}, target: target{system: "other_sql"}}
		c.init(in, genericDriver(in.Driver(), opts))
		return c, nil
	case *stdlib.Driver:
		return pgDriver.connector(dsn, opts, poolSizing)
	case *mysql.MySQLDriver:
		return mysqlDriver.connector(dsn, opts, poolSizing)
	case driver.Driver:
		if err := checkOptions(&opts, poolSizing); err != nil {
			return nil, err
		}
		d := genericDriver(in, opts)
		return d.connector(dsn, opts, poolSizing)
	case nil:
		return nil, errors.New("resilientpg: NewConnector: inner is nil")
	}
	return nil, fmt.Errorf("resilientpg: NewConnector: inner is a %T, want a driver.Connector or a driver.Driver", inner)
}

// checkOptions validates Options given in code for a connector the
// wrapper did not build itself, which has no per-connect hook to put
// credentials in.
func checkOptions(o *Options, poolSizing bool) error {
	if reflect.ValueOf(*o).IsZero() {
		return errors.New("resilientpg: Options{} is not a valid configuration: start from DefaultOptions()")
	}
	if err := claimKeys(nil, o, poolSizing); err != nil {
		return err
	}
	if o.tcpChanged() {
		return o.tcpUnapplicable("the default with a connector you built (it dials with its own dialer); the TCP settings apply to the resilientpg and resilientmysql drivers and to pgx or go-sql-driver/mysql DSNs")
	}
	if o.hasCredentials() {
		key, v := keyPasswordFile, o.PasswordFile
		if o.Credentials != nil {
			key, v = "Options.Credentials", "set"
		}
		return &ConfigError{Key: key, Value: v,
			Allowed: "credentials only with the resilientpg and resilientmysql drivers (a pgx or go-sql-driver/mysql DSN), whose connect hooks the wrapper sets"}
	}
	return nil
}
