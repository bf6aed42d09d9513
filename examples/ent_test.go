package examples

import (
	"context"
	"database/sql"
	"fmt"
	"testing"

	"entgo.io/ent/dialect"
	entsql "entgo.io/ent/dialect/sql"
	"entgo.io/ent/dialect/sql/schema"
	"entgo.io/ent/schema/field"
)

// entUsers is what ent's code generator writes into ent/migrate/schema.go;
// written by hand here so the test needs no generated client. A generated
// client takes the same driver: ent.NewClient(ent.Driver(drv)).
var (
	entUsersColumns = []*schema.Column{
		{Name: "id", Type: field.TypeInt, Increment: true},
		{Name: "name", Type: field.TypeString},
	}
	entUsersTable = &schema.Table{Name: "ex_ent_users", Columns: entUsersColumns,
		PrimaryKey: []*schema.Column{entUsersColumns[0]}}
)

// entFlow: entsql.OpenDB over the wrapper's *sql.DB, ent's own migration
// (what client.Schema.Create runs), inserts in a transaction and selects
// through ent's SQL builder; then the kill and 50 such operations.
func entFlow(t *testing.T, tg target, dialectName string) {
	t.Helper()
	drv := entsql.OpenDB(dialectName, tg.open(t))
	ctx := ctxT(t)
	if _, err := drv.DB().ExecContext(ctx, "DROP TABLE IF EXISTS ex_ent_users"); err != nil {
		t.Fatal(err)
	}
	m, err := schema.NewMigrate(drv)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Create(ctx, entUsersTable); err != nil {
		t.Fatalf("schema create: %v", err)
	}
	t.Cleanup(func() { drv.DB().Exec("DROP TABLE IF EXISTS ex_ent_users") })

	b := entsql.Dialect(drv.Dialect())
	insert := func(ctx context.Context, name string) error {
		tx, err := drv.Tx(ctx)
		if err != nil {
			return err
		}
		q, args := b.Insert("ex_ent_users").Columns("name").Values(name).Query()
		var res sql.Result
		if err := tx.Exec(ctx, q, args, &res); err != nil {
			tx.Rollback()
			return err
		}
		return tx.Commit()
	}
	count := func(ctx context.Context, names ...any) (int, error) {
		q, args := b.Select("id", "name").From(entsql.Table("ex_ent_users")).Where(entsql.In("name", names...)).Query()
		var rows entsql.Rows
		if err := drv.Query(ctx, q, args, &rows); err != nil {
			return 0, err
		}
		defer rows.Close()
		n := 0
		for rows.Next() {
			n++
		}
		return n, rows.Err()
	}
	if err := insert(ctx, "a8m"); err != nil {
		t.Fatalf("insert: %v", err)
	}
	if n, err := count(ctx, "a8m"); err != nil || n != 1 {
		t.Fatalf("select: %d rows, %v", n, err)
	}

	proveAfterKill(t, tg, drv.DB(), "ent "+dialectName, func(ctx context.Context, i int) error {
		name := fmt.Sprint("user", i)
		if err := insert(ctx, name); err != nil {
			return err
		}
		n, err := count(ctx, "a8m", name)
		if err == nil && n != 2 {
			err = fmt.Errorf("select returned %d rows, want 2", n)
		}
		return err
	})
}

// TestEntPostgres: entsql.Open("postgres", dsn) would sql.Open the driver
// named "postgres" (lib/pq); ent uses its first argument both as the
// database/sql driver name and as the SQL dialect, so open the wrapper
// yourself and pass the dialect to OpenDB.
func TestEntPostgres(t *testing.T) {
	t.Parallel()
	entFlow(t, pgTarget(t, "ent"), dialect.Postgres)
}

func TestEntMySQL(t *testing.T) {
	t.Parallel()
	entFlow(t, myTarget(t, "ent"), dialect.MySQL)
}
