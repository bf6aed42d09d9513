package examples

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"sync"
	"testing"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed testdata/goose/*.sql
var gooseFS embed.FS

// gooseSeed is an in-code Go migration, next to the embedded SQL ones.
var gooseSeed = goose.NewGoMigration(3,
	&goose.GoFunc{RunTx: func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO ex_goose_items (id, name, price) VALUES (1, 'seed', 10)")
		return err
	}},
	&goose.GoFunc{RunTx: func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "DELETE FROM ex_goose_items WHERE id = 1")
		return err
	}},
)

// gooseFlow: goose's Provider over the wrapper's *sql.DB (goose takes any
// *sql.DB; note that Provider.Close closes it), Up, then the kill and 50
// provider operations.
func gooseFlow(t *testing.T, tg target, dialect goose.Dialect, opts ...goose.ProviderOption) {
	t.Helper()
	db := tg.open(t)
	ctx := ctxT(t)
	drop := func() {
		for _, q := range []string{"DROP TABLE IF EXISTS ex_goose_items", "DROP TABLE IF EXISTS ex_goose_version"} {
			if _, err := db.ExecContext(ctx, q); err != nil {
				t.Fatal(err)
			}
		}
	}
	drop()
	t.Cleanup(drop)
	migrations, err := fs.Sub(gooseFS, "testdata/goose")
	if err != nil {
		t.Fatal(err)
	}
	opts = append(opts, goose.WithTableName("ex_goose_version"), goose.WithGoMigrations(gooseSeed),
		goose.WithLogger(goose.NopLogger()))
	p, err := goose.NewProvider(dialect, db, migrations, opts...)
	if err != nil {
		t.Fatal(err)
	}
	res, err := p.Up(ctx)
	if err != nil || len(res) != 3 {
		t.Fatalf("Up: %d migrations, %v", len(res), err)
	}

	// One call at a time, as goose is used. Concurrent calls on a Provider
	// with a session locker can stall: goose unlocks its mutex before it
	// releases the advisory lock, so the next call may find the lock still
	// held and back off for 5 s.
	var mu sync.Mutex
	proveAfterKill(t, tg, db, "goose "+string(dialect), func(ctx context.Context, i int) error {
		mu.Lock()
		defer mu.Unlock()
		switch i % 4 {
		case 0:
			v, err := p.GetDBVersion(ctx)
			if err == nil && v != 3 {
				err = fmt.Errorf("version %d, want 3", v)
			}
			return err
		case 1:
			pending, err := p.HasPending(ctx)
			if err == nil && pending {
				err = fmt.Errorf("pending migrations after Up")
			}
			return err
		case 2:
			res, err := p.Up(ctx) // a no-op, taking the lock if there is one
			if err == nil && len(res) != 0 {
				err = fmt.Errorf("Up applied %d migrations again", len(res))
			}
			return err
		default:
			st, err := p.Status(ctx)
			if err == nil && (len(st) != 3 || st[2].State != goose.StateApplied) {
				err = fmt.Errorf("status %+v", st)
			}
			return err
		}
	})
}

// TestGoosePostgres also takes goose's advisory session lock, which pins a
// connection while it migrates.
func TestGoosePostgres(t *testing.T) {
	t.Parallel()
	locker, err := lock.NewPostgresSessionLocker(lock.WithLockID(0x7265786d706c))
	if err != nil {
		t.Fatal(err)
	}
	gooseFlow(t, pgTarget(t, "goose"), goose.DialectPostgres, goose.WithSessionLocker(locker))
}

func TestGooseMySQL(t *testing.T) {
	t.Parallel()
	gooseFlow(t, myTarget(t, "goose"), goose.DialectMySQL)
}
