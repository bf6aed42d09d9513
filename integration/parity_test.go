package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
)

// optionalIface is one optional driver.Conn interface database/sql looks for.
type optionalIface struct {
	name string
	has  func(any) bool
}

// optionalIfaces lists them all. Execer and Queryer are deprecated, but
// database/sql still honours them, so parity must cover them.
var optionalIfaces = []optionalIface{
	{"ConnPrepareContext", func(c any) bool { _, ok := c.(driver.ConnPrepareContext); return ok }},
	{"ConnBeginTx", func(c any) bool { _, ok := c.(driver.ConnBeginTx); return ok }},
	{"ExecerContext", func(c any) bool { _, ok := c.(driver.ExecerContext); return ok }},
	{"QueryerContext", func(c any) bool { _, ok := c.(driver.QueryerContext); return ok }},
	{"Execer", func(c any) bool { _, ok := c.(driver.Execer); return ok }},   //lint:ignore SA1019 see optionalIfaces
	{"Queryer", func(c any) bool { _, ok := c.(driver.Queryer); return ok }}, //lint:ignore SA1019 see optionalIfaces
	{"NamedValueChecker", func(c any) bool { _, ok := c.(driver.NamedValueChecker); return ok }},
	{"Pinger", func(c any) bool { _, ok := c.(driver.Pinger); return ok }},
	{"SessionResetter", func(c any) bool { _, ok := c.(driver.SessionResetter); return ok }},
	{"Validator", func(c any) bool { _, ok := c.(driver.Validator); return ok }},
}

// The optional interfaces each inner conn implements, as of pgx v5.12.0 and
// go-sql-driver/mysql v1.10.1. When an upgrade changes one, conn.go's
// forwarding (and its fallbacks) must be reviewed before this table is.
var (
	wantPgx = map[string]bool{
		"ConnPrepareContext": true, "ConnBeginTx": true, "ExecerContext": true, "QueryerContext": true,
		"Execer": false, "Queryer": false,
		"NamedValueChecker": true, "Pinger": true, "SessionResetter": true, "Validator": false,
	}
	wantMySQL = map[string]bool{
		"ConnPrepareContext": true, "ConnBeginTx": true, "ExecerContext": true, "QueryerContext": true,
		"Execer": true, "Queryer": true,
		"NamedValueChecker": true, "Pinger": true, "SessionResetter": true, "Validator": true,
	}
	// The wrapper offers every context-era interface whatever the inner
	// conn has, and never the legacy Execer/Queryer (it falls back to them
	// inside ExecContext/QueryContext instead).
	wantWrapper = map[string]bool{
		"ConnPrepareContext": true, "ConnBeginTx": true, "ExecerContext": true, "QueryerContext": true,
		"Execer": false, "Queryer": false,
		"NamedValueChecker": true, "Pinger": true, "SessionResetter": true, "Validator": true,
	}
)

func TestParityRealConnTypes(t *testing.T) {
	cases := []struct {
		e         engine
		wantType  string
		wantInner map[string]bool
		extra     func(t *testing.T, ctx context.Context, sc *sql.Conn)
	}{
		{pgEngine{}, "*stdlib.Conn", wantPgx, pgxCopyFrom},
		{mysqlEngine{}, "*mysql.mysqlConn", wantMySQL, nil},
	}
	for _, c := range cases {
		t.Run(c.e.name(), func(t *testing.T) {
			c.e.require(t)
			ctx := ctxT(t, 30*time.Second)
			p := c.e.open(t, c.e.wrapperDriver())
			sc, err := p.db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			err = sc.Raw(func(dc any) error {
				compareIfaces(t, "wrapper conn "+fmt.Sprintf("%T", dc), dc, wantWrapper,
					"the wrapper's interface set changed: review conn.go's compile-time list and database/sql's fallbacks")

				inner := resilientpg.UnwrapConn(dc)
				if inner == dc {
					return fmt.Errorf("UnwrapConn returned the wrapper itself (%T)", dc)
				}
				u, ok := dc.(interface{ Unwrap() driver.Conn })
				if !ok {
					return fmt.Errorf("the wrapper conn %T has no Unwrap() driver.Conn", dc)
				}
				if any(u.Unwrap()) != inner {
					return fmt.Errorf("Unwrap() and UnwrapConn disagree: %T vs %T", u.Unwrap(), inner)
				}
				if again := resilientpg.UnwrapConn(inner); again != inner {
					return fmt.Errorf("UnwrapConn of the inner conn is not the inner conn itself: %T", again)
				}
				if got := fmt.Sprintf("%T", inner); got != c.wantType {
					return fmt.Errorf("inner conn is a %s, want %s", got, c.wantType)
				}
				compareIfaces(t, "inner "+c.wantType, inner, c.wantInner,
					"the inner driver's optional interfaces changed (driver upgrade?): review the wrapper's forwarding in conn.go, then update this table")
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if c.extra != nil {
				c.extra(t, ctx, sc)
			}
		})
	}
}

func compareIfaces(t *testing.T, what string, c any, want map[string]bool, advice string) {
	t.Helper()
	if len(want) != len(optionalIfaces) {
		t.Fatalf("test bug: the expectation table for %s has %d entries, want %d", what, len(want), len(optionalIfaces))
	}
	for _, i := range optionalIfaces {
		w, ok := want[i.name]
		if !ok {
			t.Fatalf("test bug: no expectation for %s", i.name)
		}
		if got := i.has(c); got != w {
			t.Errorf("%s: implements driver.%s = %v, want %v; %s", what, i.name, got, w, advice)
		}
	}
}

// pgxCopyFrom is the README's CopyFrom example: inside sql.Conn.Raw,
// UnwrapConn reaches pgx's *stdlib.Conn, whose pgx.Conn copies 3 rows into a
// temporary table of the same session.
func pgxCopyFrom(t *testing.T, ctx context.Context, sc *sql.Conn) {
	t.Helper()
	if _, err := sc.ExecContext(ctx, "CREATE TEMPORARY TABLE rpg_copy (id int PRIMARY KEY, name text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	rows := [][]any{{1, "one"}, {2, "two"}, {3, "three"}}
	var copied, pgxPID int64
	err := sc.Raw(func(dc any) error {
		pgxConn := resilientpg.UnwrapConn(dc).(*stdlib.Conn).Conn()
		pgxPID = int64(pgxConn.PgConn().PID())
		n, err := pgxConn.CopyFrom(ctx, pgx.Identifier{"rpg_copy"}, []string{"id", "name"}, pgx.CopyFromRows(rows))
		copied = n
		return err
	})
	if err != nil {
		t.Fatalf("CopyFrom through UnwrapConn: %v", err)
	}
	if copied != 3 {
		t.Errorf("CopyFrom reported %d rows, want 3", copied)
	}
	var n, sum, pid int64
	if err := sc.QueryRowContext(ctx, "SELECT count(*), sum(id), pg_backend_pid() FROM rpg_copy").Scan(&n, &sum, &pid); err != nil {
		t.Fatal(err)
	}
	if n != 3 || sum != 6 {
		t.Errorf("the table holds %d rows summing to %d, want 3 and 6", n, sum)
	}
	if pid != pgxPID {
		t.Errorf("PgConn().PID() = %d, but the session is backend %d", pgxPID, pid)
	}
}
