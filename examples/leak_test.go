package examples

import (
	"database/sql"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"entgo.io/ent/dialect"
	entsql "entgo.io/ent/dialect/sql"
	"github.com/XSAM/otelsql"
	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/jmoiron/sqlx"
	"github.com/uptrace/bun"
	"github.com/uptrace/bun/dialect/mysqldialect"
	"github.com/uptrace/bun/dialect/pgdialect"
	"github.com/uptrace/bun/schema"
	gormmysql "gorm.io/driver/mysql"
	gormpostgres "gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/eventlog"
)

// leakThreshold is the resilient_leak_threshold of TestLeakStackThroughLibraries.
const leakThreshold = 300 * time.Millisecond

// lineBelow returns "file:line" of the line after its caller's.
func lineBelow() string {
	_, file, line, _ := runtime.Caller(1)
	return file + ":" + strconv.Itoa(line+1)
}

// TestLeakStackThroughLibraries leaks connections through sqlx, gorm, bun
// and ent over one wrapper pool, and through otelsql over another
// (resilient_leak_threshold in the DSN, events captured by a slog handler),
// and checks that each leak gives exactly one leak.suspected whose stack
// starts at this file's line that leaked it: the frames of database/sql,
// the wrapper, the driver and the library on top are trimmed, however deep
// the library's call chain (gorm's Raw().Rows() runs its callback chain),
// and one leak.returned after release.
func TestLeakStackThroughLibraries(t *testing.T) {
	for _, e := range []struct {
		name  string
		mysql bool
	}{{"postgres", false}, {"mysql", true}} {
		t.Run(e.name, func(t *testing.T) {
			t.Parallel()
			var (
				tg         target
				inner      any
				sqlxName   string
				dialector  func(*sql.DB) gorm.Dialector
				bunDial    schema.Dialect
				entDialect string
			)
			if e.mysql {
				tg, inner, sqlxName, bunDial, entDialect = myTarget(t, "leak"), &mysql.MySQLDriver{}, "mysql", mysqldialect.New(), dialect.MySQL
				dialector = func(db *sql.DB) gorm.Dialector { return gormmysql.New(gormmysql.Config{Conn: db}) }
			} else {
				tg, inner, sqlxName, bunDial, entDialect = pgTarget(t, "leak"), stdlib.GetDefaultDriver(), "pgx", pgdialect.New(), dialect.Postgres
				dialector = func(db *sql.DB) gorm.Dialector { return gormpostgres.New(gormpostgres.Config{Conn: db}) }
			}
			rec := &eventlog.Recorder{}
			opts := resilientpg.DefaultOptions()
			opts.Log, opts.Logger = resilientpg.LogInfo, rec.Logger()
			sep := "?"
			if strings.Contains(tg.dsn, "?") {
				sep = "&"
			} else if !e.mysql && !strings.Contains(tg.dsn, "://") {
				sep = " " // a keyword/value DSN
			}
			dsn := tg.dsn + sep + "resilient_leak_threshold=" + leakThreshold.String()
			c, err := resilientpg.NewConnector(inner, opts, dsn)
			if err != nil {
				t.Fatalf("NewConnector: %v", err)
			}
			if got := c.Options().LeakThreshold; got != leakThreshold {
				t.Fatalf("resilient_leak_threshold from the DSN: %v, want %v", got, leakThreshold)
			}
			db := sql.OpenDB(c)
			t.Cleanup(func() { db.Close() })
			db.SetMaxOpenConns(10)

			ctx := ctxT(t)
			xdb := sqlx.NewDb(db, sqlxName)
			gdb, err := gorm.Open(dialector(db), &gorm.Config{Logger: logger.Discard})
			if err != nil {
				t.Fatalf("gorm.Open: %v", err)
			}
			bdb := bun.NewDB(db, bunDial)
			edrv := entsql.OpenDB(entDialect, db)
			// otelsql goes outside the wrapper (see otelsql_test.go): a pool
			// of its own over a second connector logging to the same handler.
			c2, err := resilientpg.NewConnector(inner, opts, dsn)
			if err != nil {
				t.Fatalf("NewConnector: %v", err)
			}
			odb := otelsql.OpenDB(c2)
			t.Cleanup(func() { odb.Close() })

			leaks := map[string]string{} // file:line -> how it leaked
			var release []func() error

			at := lineBelow()
			rows, err := xdb.QueryxContext(ctx, "SELECT 1")
			if err != nil {
				t.Fatalf("sqlx QueryxContext: %v", err)
			}
			leaks[at], release = "sqlx QueryxContext (unclosed *sqlx.Rows)", append(release, rows.Close)

			at = lineBelow()
			xtx, err := xdb.BeginTxx(ctx, nil)
			if err != nil {
				t.Fatalf("sqlx BeginTxx: %v", err)
			}
			leaks[at], release = "sqlx BeginTxx (open *sqlx.Tx)", append(release, xtx.Rollback)

			at = lineBelow()
			gtx := gdb.WithContext(ctx).Begin()
			if gtx.Error != nil {
				t.Fatalf("gorm Begin: %v", gtx.Error)
			}
			leaks[at], release = "gorm Begin (open transaction)", append(release, func() error { return gtx.Rollback().Error })

			at = lineBelow()
			grows, err := gdb.WithContext(ctx).Raw("SELECT 1").Rows()
			if err != nil {
				t.Fatalf("gorm Raw().Rows(): %v", err)
			}
			leaks[at], release = "gorm Raw().Rows() (unclosed *sql.Rows)", append(release, grows.Close)

			at = lineBelow()
			btx, err := bdb.BeginTx(ctx, nil)
			if err != nil {
				t.Fatalf("bun BeginTx: %v", err)
			}
			leaks[at], release = "bun BeginTx (open bun.Tx)", append(release, btx.Rollback)

			at = lineBelow()
			etx, err := edrv.Tx(ctx)
			if err != nil {
				t.Fatalf("ent Tx: %v", err)
			}
			leaks[at], release = "ent Tx (open dialect.Tx)", append(release, etx.Rollback)

			at = lineBelow()
			orows, err := odb.QueryContext(ctx, "SELECT 1")
			if err != nil {
				t.Fatalf("otelsql QueryContext: %v", err)
			}
			leaks[at], release = "otelsql QueryContext (unclosed *sql.Rows)", append(release, orows.Close)

			// Each is reported once within 1.25 thresholds; wait for all.
			deadline := time.Now().Add(10 * leakThreshold)
			for len(rec.Events("leak.suspected")) < len(leaks) && time.Now().Before(deadline) {
				time.Sleep(leakThreshold / 4)
			}
			time.Sleep(leakThreshold) // a duplicate report would come by now
			recs := rec.Events("leak.suspected")
			if len(recs) != len(leaks) {
				t.Errorf("%d leak.suspected records, want %d (one per leak)", len(recs), len(leaks))
			}
			seen := map[string]int{}
			for _, r := range recs {
				stack := r.Attrs["stack"].String()
				first, _, _ := strings.Cut(stack, "\n")
				where, fn, _ := strings.Cut(first, " ")
				seen[where]++
				if _, ok := leaks[where]; !ok {
					t.Errorf("leak.suspected's first frame %q is not a line of this test that leaked a connection\nstack:\n%s", first, stack)
					continue
				}
				if !strings.Contains(fn, "TestLeakStackThroughLibraries") {
					t.Errorf("%s: first frame's function %q is not the test's", leaks[where], fn)
				}
			}
			for at, how := range leaks {
				if seen[at] != 1 {
					t.Errorf("%s at %s: %d leak.suspected records start there, want 1", how, at, seen[at])
				}
			}

			for _, f := range release {
				if err := f(); err != nil {
					t.Errorf("release: %v", err)
				}
			}
			if n := len(rec.Events("leak.returned")); n != len(leaks) {
				t.Errorf("%d leak.returned records after release, want %d", n, len(leaks))
			}
		})
	}
}
