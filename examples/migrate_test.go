package examples

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/golang-migrate/migrate/v4"
	"github.com/golang-migrate/migrate/v4/database"
	mysqlmigrate "github.com/golang-migrate/migrate/v4/database/mysql"
	pgxmigrate "github.com/golang-migrate/migrate/v4/database/pgx/v5"
	"github.com/golang-migrate/migrate/v4/source/iofs"
)

//go:embed testdata/migrate/*.sql
var migrateFS embed.FS

// migrateFlow: golang-migrate over the wrapper's *sql.DB. The URL form
// (migrate.New("pgx5://..." or "mysql://...")) would open its own pool on
// the bare driver, so the database driver is built with WithInstance.
//
// WithInstance pins one connection of the pool (db.Conn) for the
// instance's life, and m.Close closes the *sql.DB as well. The pinned
// connection is never checked out again, so no pool-level check can save
// it: an instance kept open across a kill fails (asserted below). Run
// migrations on a *sql.DB of their own and Close it, or build a fresh
// instance for each run, as the burst does.
func migrateFlow(t *testing.T, tg target, name string, open func(*sql.DB) (database.Driver, error)) {
	t.Helper()
	db := tg.open(t)
	db.SetMaxOpenConns(poolSize + 2) // room for two pinned connections
	db.SetMaxIdleConns(poolSize + 2)
	ctx := ctxT(t)
	for _, q := range []string{"DROP TABLE IF EXISTS ex_migrate_items", "DROP TABLE IF EXISTS ex_migrate_version"} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if !tg.mysql { // on MySQL the test's database goes; db itself is closed by m.Close
		t.Cleanup(func() {
			tg.admin(t, "DROP TABLE IF EXISTS ex_migrate_items", "DROP TABLE IF EXISTS ex_migrate_version")
		})
	}
	newMigrate := func() *migrate.Migrate {
		t.Helper()
		drv, err := open(db)
		if err != nil {
			t.Fatalf("WithInstance: %v", err)
		}
		src, err := iofs.New(migrateFS, "testdata/migrate")
		if err != nil {
			t.Fatal(err)
		}
		m, err := migrate.NewWithInstance("iofs", src, name, drv)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}

	before := newMigrate()
	if err := before.Up(); err != nil {
		t.Fatalf("Up: %v", err)
	}
	if v, dirty, err := before.Version(); err != nil || v != 2 || dirty {
		t.Fatalf("Version = %d, %v, %v; want 2", v, dirty, err)
	}

	killPool(t, tg, db) // its application_name or database covers the pinned connection too
	if _, _, err := before.Version(); err == nil {
		t.Errorf("an instance made before the kill still works; the pinned-connection warning is stale")
	} else {
		t.Logf("as documented, the instance made before the kill fails: %v", err)
	}
	// Close stops its source and closes db too, so only at the very end.
	t.Cleanup(func() { before.Close() })

	after := newMigrate() // its Ping and Conn go through the killed pool
	t.Cleanup(func() { after.Close() })
	var mu sync.Mutex // a Migrate runs one call at a time (its own lock says ErrLocked)
	burst(t, "golang-migrate "+name, func(ctx context.Context, i int) error {
		mu.Lock()
		if i%2 == 0 {
			if err := after.Up(); err != nil && !errors.Is(err, migrate.ErrNoChange) {
				mu.Unlock()
				return err
			}
		} else if v, _, err := after.Version(); err != nil || v != 2 {
			mu.Unlock()
			return fmt.Errorf("Version = %d, %v; want 2", v, err)
		}
		mu.Unlock()
		var n int
		return db.QueryRowContext(ctx, "SELECT count(*) FROM ex_migrate_items").Scan(&n)
	})
}

// TestMigratePostgres uses migrate's pgx v5 driver, which needs no lib/pq.
func TestMigratePostgres(t *testing.T) {
	t.Parallel()
	migrateFlow(t, pgTarget(t, "migrate"), "pgx5", func(db *sql.DB) (database.Driver, error) {
		return pgxmigrate.WithInstance(db, &pgxmigrate.Config{MigrationsTable: "ex_migrate_version"})
	})
}

// TestMigrateMySQL: migration files with several statements each would
// need multiStatements=true in the DSN.
func TestMigrateMySQL(t *testing.T) {
	t.Parallel()
	migrateFlow(t, myTarget(t, "migrate"), "mysql", func(db *sql.DB) (database.Driver, error) {
		return mysqlmigrate.WithInstance(db, &mysqlmigrate.Config{MigrationsTable: "ex_migrate_version"})
	})
}
