package examples

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jmoiron/sqlx"
)

type sqlxPerson struct {
	ID    int64  `db:"id"`
	Name  string `db:"name"`
	Email string `db:"email"`
}

// sqlxFlow is what sqlx's README does: create, NamedExec, Rebind, Select,
// Get; then the kill and 50 operations mixing the same calls.
func sqlxFlow(t *testing.T, tg target, db *sqlx.DB, table, idType string) {
	t.Helper()
	ctx := ctxT(t)
	db.MustExecContext(ctx, "DROP TABLE IF EXISTS "+table)
	db.MustExecContext(ctx, "CREATE TABLE "+table+" (id "+idType+" PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)")
	t.Cleanup(func() { db.Exec("DROP TABLE IF EXISTS " + table) })

	insert := "INSERT INTO " + table + " (id, name, email) VALUES (:id, :name, :email)"
	if _, err := db.NamedExecContext(ctx, insert, sqlxPerson{ID: 1, Name: "Jason", Email: "jason@example.com"}); err != nil {
		t.Fatalf("NamedExec: %v", err)
	}
	var p sqlxPerson
	if err := db.GetContext(ctx, &p, db.Rebind("SELECT * FROM "+table+" WHERE name = ?"), "Jason"); err != nil || p.ID != 1 {
		t.Fatalf("Get: %+v, %v", p, err)
	}

	sizePool(db.DB)
	proveAfterKill(t, tg, db.DB, "sqlx "+db.DriverName(), func(ctx context.Context, i int) error {
		id := int64(100 + i)
		if _, err := db.NamedExecContext(ctx, insert, sqlxPerson{ID: id, Name: fmt.Sprint("p", i), Email: "x"}); err != nil {
			return err
		}
		var got []sqlxPerson
		if err := db.SelectContext(ctx, &got, db.Rebind("SELECT * FROM "+table+" WHERE id = ? OR id = ?"), id, 1); err != nil {
			return err
		}
		if len(got) != 2 {
			return fmt.Errorf("select returned %d rows, want 2", len(got))
		}
		return nil
	})
}

// TestSqlxUnboundDriverName keeps the README's warning true: sqlx maps
// driver names to placeholder styles and does not know "resilientpg", so
// without BindDriver its Rebind leaves "?", which PostgreSQL rejects. It is
// not parallel, so no other test's BindDriver runs meanwhile.
func TestSqlxUnboundDriverName(t *testing.T) {
	// sqlx cannot unbind; UNKNOWN is its state for a name never bound. This
	// undoes the binding a previous -count iteration made.
	sqlx.BindDriver("resilientpg", sqlx.UNKNOWN)

	tg := pgTarget(t, "sqlx_unbound")
	db, err := sqlx.Open("resilientpg", tg.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if got := db.Rebind("SELECT ?"); got != "SELECT ?" {
		t.Fatalf("unbound Rebind = %q; sqlx now knows the name, update the README", got)
	}
	var n int
	err = db.GetContext(ctxT(t), &n, db.Rebind("SELECT ?::int"), 1)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42601" {
		t.Fatalf("query with an unrebound '?' = %v, want a syntax error (42601)", err)
	}

	sqlx.BindDriver("resilientpg", sqlx.DOLLAR)
	if got := db.Rebind("SELECT ?"); got != "SELECT $1" {
		t.Fatalf("bound Rebind = %q, want SELECT $1", got)
	}
}

// TestSqlxNewDbPostgres: sqlx.NewDb over the wrapper's *sql.DB, naming
// "pgx" only to pick sqlx's $n placeholders.
func TestSqlxNewDbPostgres(t *testing.T) {
	t.Parallel()
	tg := pgTarget(t, "sqlx_newdb")
	db := sqlx.NewDb(tg.open(t), "pgx")
	if got := db.Rebind("?"); got != "$1" {
		t.Fatalf("Rebind = %q, want $1", got)
	}
	sqlxFlow(t, tg, db, "ex_sqlx_newdb", "BIGINT")
}

// TestSqlxOpenPostgres: sqlx.Open("resilientpg") after BindDriver.
func TestSqlxOpenPostgres(t *testing.T) {
	t.Parallel()
	sqlx.BindDriver("resilientpg", sqlx.DOLLAR)
	tg := pgTarget(t, "sqlx_open")
	db, err := sqlx.Open("resilientpg", tg.dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if got := db.Rebind("?"); got != "$1" {
		t.Fatalf("Rebind = %q, want $1", got)
	}
	sqlxFlow(t, tg, db, "ex_sqlx_open", "BIGINT")
}

// TestSqlxOpenMySQL: sqlx.Open("resilientmysql") needs no BindDriver, since
// sqlx treats an unknown name like "?" (QUESTION), which is MySQL's style.
func TestSqlxOpenMySQL(t *testing.T) {
	t.Parallel()
	tg := myTarget(t, "sqlx")
	db, err := sqlx.Open("resilientmysql", tg.dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if bt := sqlx.BindType("resilientmysql"); bt != sqlx.UNKNOWN && bt != sqlx.QUESTION {
		t.Fatalf("BindType(resilientmysql) = %d, want UNKNOWN or QUESTION", bt)
	}
	sqlxFlow(t, tg, db, "ex_sqlx", "BIGINT")
}
