package examples

import (
	"context"
	"fmt"
	"testing"

	"github.com/uptrace/bun"
	"github.com/uptrace/bun/dialect/mysqldialect"
	"github.com/uptrace/bun/dialect/pgdialect"
	"github.com/uptrace/bun/schema"
)

type bunUser struct {
	bun.BaseModel `bun:"table:ex_bun_users"`

	ID   int64  `bun:",pk,autoincrement"`
	Name string `bun:",notnull"`
}

// bunFlow is bun's README: bun.NewDB over a *sql.DB, NewCreateTable,
// NewInsert, NewSelect; then the kill and 50 insert+select operations.
func bunFlow(t *testing.T, tg target, dialect schema.Dialect) {
	t.Helper()
	db := bun.NewDB(tg.open(t), dialect)
	ctx := ctxT(t)
	if _, err := db.NewDropTable().Model((*bunUser)(nil)).IfExists().Exec(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := db.NewCreateTable().Model((*bunUser)(nil)).Exec(ctx); err != nil {
		t.Fatalf("NewCreateTable: %v", err)
	}
	t.Cleanup(func() { db.NewDropTable().Model((*bunUser)(nil)).IfExists().Exec(context.Background()) })
	u := &bunUser{Name: "admin"}
	if _, err := db.NewInsert().Model(u).Exec(ctx); err != nil {
		t.Fatalf("NewInsert: %v", err)
	}
	var got bunUser
	if err := db.NewSelect().Model(&got).Where("name = ?", "admin").Scan(ctx); err != nil || got.Name != "admin" {
		t.Fatalf("NewSelect: %+v, %v", got, err)
	}

	proveAfterKill(t, tg, db.DB, "bun "+dialect.Name().String(), func(ctx context.Context, i int) error {
		name := fmt.Sprint("user", i)
		if _, err := db.NewInsert().Model(&bunUser{Name: name}).Exec(ctx); err != nil {
			return err
		}
		var users []bunUser
		if err := db.NewSelect().Model(&users).Where("name IN (?)", bun.List([]string{"admin", name})).Scan(ctx); err != nil {
			return err
		}
		if len(users) != 2 {
			return fmt.Errorf("select returned %d rows, want 2", len(users))
		}
		return nil
	})
}

func TestBunPostgres(t *testing.T) {
	t.Parallel()
	bunFlow(t, pgTarget(t, "bun"), pgdialect.New())
}

func TestBunMySQL(t *testing.T) {
	t.Parallel()
	bunFlow(t, myTarget(t, "bun"), mysqldialect.New())
}
