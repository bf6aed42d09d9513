package integration

import (
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/eventlog"
)

// TestLeakDetectionRealServer: on both engines, 10,000 short operations at
// concurrency 8 with a 1 s threshold report no leak; a connection then held
// for twice the threshold is reported once, with the test's own line as its
// first frame, and once more as returned. After db.Close no goroutine of
// the wrapper's is left.
func TestLeakDetectionRealServer(t *testing.T) {
	for _, e := range allEngines() {
		t.Run(e.name(), func(t *testing.T) {
			e.require(t)
			before := runtime.NumGoroutine()
			log := &eventlog.Recorder{}
			opts := resilientpg.DefaultOptions()
			opts.Log, opts.Logger, opts.LeakThreshold = resilientpg.LogInfo, log.Logger(), time.Second
			opts.MaxOpenConns, opts.MaxIdleConns = 8, 8
			var inner any = stdlib.GetDefaultDriver()
			dsn := postgresDSN()
			if e.name() == "mysql" {
				inner, dsn = &mysql.MySQLDriver{}, mysqlDSN()
			}
			db, err := resilientpg.OpenDB(inner, opts, dsn)
			if err != nil {
				t.Fatal(err)
			}
			ctx := ctxT(t, time.Minute)
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for range 8 {
				wg.Go(func() {
					for range 1250 {
						var n int
						if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&n); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("load: %v", err)
			}
			if n := len(log.Events("leak.suspected")); n != 0 {
				t.Errorf("%d leak.suspected over 10,000 short operations, want 0", n)
			}

			at := nextLine()
			rows, err := db.QueryContext(ctx, "SELECT 1")
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * opts.LeakThreshold)
			rows.Close()
			sus, ret := log.Events("leak.suspected"), log.Events("leak.returned")
			if len(sus) != 1 || len(ret) != 1 {
				t.Fatalf("%d leak.suspected and %d leak.returned, want 1 and 1", len(sus), len(ret))
			}
			if first, _, _ := strings.Cut(sus[0].Attrs["stack"].String(), "\n"); !strings.HasPrefix(first, at+" ") {
				t.Errorf("leak.suspected's first frame %q, want %s", first, at)
			}
			if s, _ := resilientpg.StatsOf(db); s.Checkouts < 10_000 || s.LeaksSuspected != 1 || s.LeaksReturned != 1 {
				t.Errorf("stats: %d checkouts, %d suspected, %d returned; want >= 10,000, 1, 1", s.Checkouts, s.LeaksSuspected, s.LeaksReturned)
			}

			db.Close()
			// database/sql's own goroutines end with db.Close too; allow the
			// scheduler a moment to retire them, bounded.
			deadline := time.Now().Add(5 * time.Second)
			for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := runtime.NumGoroutine(); n > before {
				buf := make([]byte, 1<<16)
				t.Errorf("%d goroutines after db.Close, %d before Open:\n%s", n, before, buf[:runtime.Stack(buf, true)])
			}
		})
	}
}

// nextLine returns "file:line" of the line after its caller's.
func nextLine() string {
	_, file, line, _ := runtime.Caller(1)
	return file + ":" + strconv.Itoa(line+1)
}
