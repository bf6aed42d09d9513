package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// TestRegistration: both names are registered to the package's drivers, and
// registering again (a second copy of the package) does not panic.
func TestRegistration(t *testing.T) {
	for _, d := range []*Driver{pgDriver, mysqlDriver} {
		if !slices.Contains(sql.Drivers(), d.name) {
			t.Fatalf("%q is not registered; sql.Drivers() = %v", d.name, sql.Drivers())
		}
		db, err := sql.Open(d.name, map[string]string{"resilientpg": "postgres://h/db", "resilientmysql": "u@tcp(h)/db"}[d.name])
		if err != nil {
			t.Fatalf("sql.Open(%q): %v", d.name, err)
		}
		// Each connector hands database/sql its own copy of the driver,
		// through which StatsOf finds it.
		own, ok := db.Driver().(*Driver)
		if !ok || own.name != d.name || own.Unwrap() != d.Unwrap() || own.owner == nil || connectorOf(db) != own.owner {
			t.Errorf("sql.Open(%q).Driver() = %#v, want a copy of the package's driver owned by the db's connector", d.name, db.Driver())
		}
		if _, ok := StatsOf(db); !ok {
			t.Errorf("StatsOf(sql.Open(%q)) = false", d.name)
		}
		db.Close()
	}
	register() // as a second copy's init would
	if got := sql.Drivers(); len(slices.Compact(slices.Sorted(slices.Values(got)))) != len(got) {
		t.Errorf("a name was registered twice: %v", got)
	}
	if _, ok := pgDriver.Unwrap().(*stdlib.Driver); !ok {
		t.Errorf("resilientpg unwraps to %T, want pgx's *stdlib.Driver", pgDriver.Unwrap())
	}
	if _, ok := mysqlDriver.Unwrap().(*mysql.MySQLDriver); !ok {
		t.Errorf("resilientmysql unwraps to %T, want *mysql.MySQLDriver", mysqlDriver.Unwrap())
	}
}

// TestDriverContext: OpenConnector parses once into a *Connector that
// belongs to the driver, with the DSN's keys claimed; database/sql uses it
// for every connection.
func TestDriverContext(t *testing.T) {
	var _ driver.DriverContext = pgDriver
	for _, tc := range []struct {
		d   *Driver
		dsn string
	}{
		{pgDriver, "postgres://h/db?resilient_ping=always"},
		{pgDriver, "host=h dbname=db resilient_ping=always"},
		{mysqlDriver, "u@tcp(h)/db?resilient_ping=always"},
	} {
		dc, err := tc.d.OpenConnector(tc.dsn)
		if err != nil {
			t.Fatalf("%s: %v", tc.dsn, err)
		}
		c, ok := dc.(*Connector)
		if !ok {
			t.Fatalf("%s: OpenConnector returned %T, want *Connector", tc.dsn, dc)
		}
		if own := c.Driver().(*Driver); own.name != tc.d.name || own.owner != c || c.Options().Ping != PingAlways {
			t.Errorf("%s: driver %v, ping %v; want the connector's copy of the driver and ping=always", tc.dsn, c.Driver(), c.Options().Ping)
		}
		if err := c.Close(); err != nil {
			t.Errorf("%s: Close: %v", tc.dsn, err)
		}
	}
}

// TestDriverOpen: the driver.Driver path connects through the same
// connector, gate included: a refused connect with connect_wait=0 fails
// fast with the refusal in the chain, never with driver.ErrBadConn.
func TestDriverOpen(t *testing.T) {
	for _, tc := range []struct {
		d   *Driver
		dsn string
	}{
		{pgDriver, "postgres://u@127.0.0.1:1/db?connect_timeout=2&resilient_connect_wait=0"},
		{mysqlDriver, "u@tcp(127.0.0.1:1)/db?timeout=2s&resilient_connect_wait=0"},
	} {
		_, err := tc.d.Open(tc.dsn)
		if err == nil {
			t.Fatalf("%s: Open on a closed port succeeded", tc.dsn)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, driver.ErrBadConn) {
			t.Errorf("%s: Open: %v; want the refusal, not ErrBadConn", tc.dsn, err)
		}
		// The same through the connector, where the dials can be counted:
		// connect_wait=0 fails after the one refused dial.
		c, err := tc.d.connector(tc.dsn, DefaultOptions(), false)
		if err != nil {
			t.Fatal(err)
		}
		var sde *ServerDownError
		if _, err := c.Connect(context.Background()); !errors.As(err, &sde) || c.gate.dials.Load() != 1 {
			t.Errorf("%s: Connect: %v after %d dials; want a ServerDownError after 1", tc.dsn, err, c.gate.dials.Load())
		}
		if _, err := tc.d.Open(tc.dsn + "&resilient_bogus=1"); err == nil || !strings.Contains(err.Error(), "resilient_bogus") {
			t.Errorf("%s: Open with a bad key: %v", tc.dsn, err)
		}
	}
}

// TestSQLOpenFailsFast: sql.Open reports a bad key at once, not at the
// first query, and pool keys point to the functions that can apply them.
func TestSQLOpenFailsFast(t *testing.T) {
	for _, tc := range []struct{ driver, dsn, want string }{
		{"resilientpg", "postgres://app:" + testPassword + "@h/db?resilient_ping=sometimes", "resilient_ping"},
		{"resilientpg", "host=h password=" + testPassword + " resilient_max_open_conns=5", "resilientpg.Open"},
		{"resilientmysql", "app:" + testPassword + "@tcp(h)/db?resilient_max_idle_conns=5", "SetMaxIdleConns"},
		{"resilientmysql", "app:" + testPassword + "@tcp(h)/db?resilient_timeout=5s", "unknown key resilient_timeout"},
	} {
		db, err := sql.Open(tc.driver, tc.dsn)
		if err == nil {
			db.Close()
			t.Errorf("sql.Open(%q) succeeded, want an error", tc.dsn)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), testPassword) {
			t.Errorf("sql.Open error %q: want it to contain %q and not the password", err, tc.want)
		}
	}
}

func TestOpenAppliesPoolKeys(t *testing.T) {
	for _, tc := range []struct{ driver, dsn string }{
		{"resilientpg", "postgres://h/db?resilient_max_open_conns=7&resilient_max_idle_conns=3"},
		{"resilientmysql", "u@tcp(h)/db?resilient_max_open_conns=7&resilient_max_idle_conns=3"},
	} {
		db, err := Open(tc.driver, tc.dsn)
		if err != nil {
			t.Fatal(err)
		}
		if got := db.Stats().MaxOpenConnections; got != 7 {
			t.Errorf("%s: MaxOpenConnections = %d, want 7", tc.driver, got)
		}
		db.Close()
	}
	if _, err := Open("pgx", "postgres://h/db"); err == nil || !strings.Contains(err.Error(), `"resilientpg"`) {
		t.Errorf("Open with a foreign driver name: %v", err)
	}
}

// TestPgxDriverDSNThroughNewConnector: giving pgx's own driver and a DSN
// takes the same parsing path as sql.Open("resilientpg").
func TestPgxDriverDSNThroughNewConnector(t *testing.T) {
	c, err := NewConnector(stdlib.GetDefaultDriver(), DefaultOptions(), "postgres://h/db?resilient_ping=never")
	if err != nil {
		t.Fatal(err)
	}
	if c.Options().Ping != PingNever {
		t.Errorf("Ping = %v, want never", c.Options().Ping)
	}
	if own := c.Driver().(*Driver); own.name != pgDriver.name || own.owner != c {
		t.Error("Driver() must be the connector's copy of the resilientpg driver")
	}
	if pgDriver.Unwrap() != stdlib.GetDefaultDriver() {
		t.Error("Unwrap must return pgx's driver")
	}
}

// TestRegisteredPgxConfigName: names from stdlib.RegisterConnConfig work as
// they do with sql.Open("pgx", name).
func TestRegisteredPgxConfigName(t *testing.T) {
	cfg, err := pgx.ParseConfig("postgres://h/db")
	if err != nil {
		t.Fatal(err)
	}
	name := stdlib.RegisterConnConfig(cfg)
	defer stdlib.UnregisterConnConfig(name)
	db, err := sql.Open("resilientpg", name)
	if err != nil {
		t.Fatalf("sql.Open(resilientpg, %q): %v", name, err)
	}
	db.Close()
}
