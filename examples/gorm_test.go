package examples

import (
	"context"
	"fmt"
	"testing"

	"github.com/resilientpg/resilientpg"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"
)

type gormProduct struct {
	ID    uint `gorm:"primaryKey"`
	Code  string
	Price uint
}

func (gormProduct) TableName() string { return "ex_gorm_products" }

// gormFlow is gorm's README: AutoMigrate, Create, First, Find; then the
// kill and 50 Create+Find operations.
func gormFlow(t *testing.T, tg target, dialector gorm.Dialector) {
	t.Helper()
	db, err := gorm.Open(dialector, &gorm.Config{Logger: logger.Discard})
	if err != nil {
		t.Fatalf("gorm.Open: %v", err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sqlDB.Close() })
	sizePool(sqlDB)
	if _, ok := sqlDB.Driver().(*resilientpg.Driver); !ok {
		t.Fatalf("gorm's pool runs on %T, not the wrapper", sqlDB.Driver())
	}

	ctx := ctxT(t)
	g := db.WithContext(ctx)
	if err := g.Migrator().DropTable(&gormProduct{}); err != nil {
		t.Fatal(err)
	}
	if err := g.AutoMigrate(&gormProduct{}); err != nil {
		t.Fatalf("AutoMigrate: %v", err)
	}
	t.Cleanup(func() { db.Migrator().DropTable(&gormProduct{}) })
	if err := g.Create(&gormProduct{Code: "D42", Price: 100}).Error; err != nil {
		t.Fatalf("Create: %v", err)
	}
	var p gormProduct
	if err := g.First(&p, "code = ?", "D42").Error; err != nil || p.Price != 100 {
		t.Fatalf("First: %+v, %v", p, err)
	}

	proveAfterKill(t, tg, sqlDB, "gorm "+dialector.Name(), func(ctx context.Context, i int) error {
		g := db.WithContext(ctx)
		if err := g.Create(&gormProduct{Code: fmt.Sprint("C", i), Price: uint(i)}).Error; err != nil {
			return err
		}
		var ps []gormProduct
		if err := g.Where("code IN ?", []string{"D42", fmt.Sprint("C", i)}).Find(&ps).Error; err != nil {
			return err
		}
		if len(ps) != 2 {
			return fmt.Errorf("Find returned %d rows, want 2", len(ps))
		}
		return nil
	})
}

// TestGormPostgres: without DriverName, gorm's postgres dialector opens pgx
// itself (stdlib.OpenDB) and the wrapper is bypassed.
func TestGormPostgres(t *testing.T) {
	t.Parallel()
	tg := pgTarget(t, "gorm")
	gormFlow(t, tg, postgres.New(postgres.Config{DriverName: "resilientpg", DSN: tg.dsn}))
}

// TestGormMySQL: gorm's mysql dialector defaults DriverName to "mysql".
func TestGormMySQL(t *testing.T) {
	t.Parallel()
	tg := myTarget(t, "gorm")
	gormFlow(t, tg, mysql.New(mysql.Config{DriverName: "resilientmysql", DSN: tg.dsn}))
}
