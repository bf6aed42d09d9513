package resilientpg

import (
	"context"
	"database/sql"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// nextLine returns "file:line" of the line after its caller's.
func nextLine() string {
	_, file, line, _ := runtime.Caller(1)
	return file + ":" + strconv.Itoa(line+1)
}

// TestLeakDetection: a sql.Conn, an unclosed *sql.Rows and an open *sql.Tx
// held for twice the threshold give exactly one leak.suspected each, whose
// stack starts at the line that checked the connection out, and one
// leak.returned each after release. The background goroutine is gone after
// db.Close: synctest.Test fails if any goroutine of the bubble is left.
func TestLeakDetection(t *testing.T) {
	for _, reused := range []bool{false, true} {
		t.Run(map[bool]string{false: "fresh", true: "reused"}[reused], func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { testLeaks(t, reused) })
		})
	}
}

func testLeaks(t *testing.T, reused bool) {
	const threshold = time.Second
	o, rec := logged(LogInfo, func(o *Options) { o.LeakThreshold = threshold })
	c, _ := newFakeConnector(shapePgx, o)
	db := sql.OpenDB(c)
	defer db.Close()
	db.SetMaxIdleConns(5)
	ctx := context.Background()
	if reused {
		holdAndRelease(t, db, 3) // checked out again at ResetSession
	}

	lines := map[string]bool{}
	at := nextLine()
	sc, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	atExec := nextLine()
	if _, err := sc.ExecContext(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if !reused {
		at = atExec // a fresh conn is checked out at its first call
	}
	lines[at] = false
	at = nextLine()
	rows, err := db.QueryContext(ctx, "SELECT 1")
	if err != nil {
		t.Fatal(err)
	}
	lines[at] = true
	at = nextLine()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	lines[at] = false

	time.Sleep(2 * threshold)
	recs := rec.Events("leak.suspected")
	if len(recs) != 3 {
		t.Fatalf("%d leak.suspected records, want 3", len(recs))
	}
	txOpen := 0
	for _, r := range recs {
		first, _, _ := strings.Cut(r.Attrs["stack"].String(), "\n")
		where, _, _ := strings.Cut(first, " ")
		if _, ok := lines[where]; !ok {
			t.Errorf("leak.suspected's first frame %q is not a checkout line of the test (%v)\nstack:\n%s", first, lines, r.Attrs["stack"])
		}
		delete(lines, where)
		if held := r.Attrs["held"].Duration(); held < threshold || held > threshold*5/4 {
			t.Errorf("reported after %v, want within [%v, %v]", held, threshold, threshold*5/4)
		}
		if r.Attrs["tx_open"].Bool() {
			txOpen++
		}
		if r.Level != slog.LevelWarn {
			t.Errorf("level %v, want warn", r.Level)
		}
	}
	if txOpen != 1 {
		t.Errorf("%d leaks with tx_open, want 1 (the *sql.Tx)", txOpen)
	}
	s := c.Stats()
	if s.LeaksSuspected != 3 || s.CheckedOut != 3 || s.OldestCheckout < 2*threshold {
		t.Errorf("stats: %d suspected, %d out, oldest %v; want 3, 3, >= %v", s.LeaksSuspected, s.CheckedOut, s.OldestCheckout, 2*threshold)
	}

	sc.Close()
	rows.Close()
	tx.Rollback()
	ret := rec.Events("leak.returned")
	if len(ret) != 3 {
		t.Fatalf("%d leak.returned records, want 3", len(ret))
	}
	for _, r := range ret {
		if held := r.Attrs["held"].Duration(); held < 2*threshold {
			t.Errorf("leak.returned held %v, want >= %v", held, 2*threshold)
		}
	}
	if s := c.Stats(); s.LeaksReturned != 3 || s.CheckedOut != 0 {
		t.Errorf("after release: %d returned, %d out; want 3 and 0", s.LeaksReturned, s.CheckedOut)
	}
	time.Sleep(3 * threshold)
	if n := len(rec.Events("leak.suspected")); n != 3 {
		t.Errorf("%d leak.suspected after release, want still 3", n)
	}
}

// TestNoLeakUnderLoad: short checkouts never look like leaks.
func TestNoLeakUnderLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o, rec := logged(LogInfo, func(o *Options) { o.LeakThreshold = time.Second })
		c, _ := newFakeConnector(shapePgx, o)
		db := sql.OpenDB(c)
		defer db.Close()
		db.SetMaxOpenConns(8)
		db.SetMaxIdleConns(8)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 1250 {
					if _, err := db.Exec("SELECT 1"); err != nil {
						t.Error(err)
						return
					}
					if i%100 == w {
						time.Sleep(10 * time.Millisecond) // let the watcher run between bursts
					}
				}
			}()
		}
		wg.Wait()
		if n := len(rec.Events("leak.suspected")); n != 0 || c.Stats().LeaksSuspected != 0 {
			t.Errorf("%d leak.suspected records over 10,000 short operations, want 0", n)
		}
		if got := c.Stats().Checkouts; got < 10_000 {
			t.Errorf("%d checkouts counted, want at least 10,000", got)
		}
	})
}

// TestPoolExhausted: MaxOpenConns(2), both connections leaked, five callers
// waiting: pool.exhausted names both leaked checkouts with their stacks.
// The two leaks are made on lines of their own, so the report must name
// two distinct connections whose stacks start one at each line: the same
// checkout listed twice cannot pass.
func TestPoolExhausted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o, rec := logged(LogWarn, func(o *Options) { o.LeakThreshold = time.Minute })
		f := &fakeConnector{shape: shapePgx}
		db, err := OpenDB(f, o)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		db.SetMaxOpenConns(2)
		ctx := context.Background()
		first := nextLine()
		rows1, err := db.QueryContext(ctx, "SELECT 1")
		if err != nil {
			t.Fatal(err)
		}
		defer rows1.Close()
		second := nextLine()
		rows2, err := db.QueryContext(ctx, "SELECT 1")
		if err != nil {
			t.Fatal(err)
		}
		defer rows2.Close()
		leaked := []string{first, second}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		for range 5 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				db.ExecContext(wctx, "SELECT 1") // waits until wctx ends
			}()
		}
		time.Sleep(2500 * time.Millisecond)
		recs := rec.Events("pool.exhausted")
		if len(recs) != 1 {
			t.Fatalf("%d pool.exhausted records, want 1", len(recs))
		}
		a := recs[0].Attrs
		if a["in_use"].Int64() != 2 || a["max_open"].Int64() != 2 || a["waits_started"].Int64() != 5 {
			t.Errorf("pool.exhausted in_use %v, max_open %v, waits_started %v; want 2, 2, 5", a["in_use"], a["max_open"], a["waits_started"])
		}
		ids := map[int64]bool{}
		starts := map[string]int{}
		for i := 1; i <= 2; i++ {
			k := "oldest." + strconv.Itoa(i) + "."
			id, ok := a[k+"conn"]
			if !ok {
				t.Errorf("oldest checkout %d has no conn id", i)
			}
			ids[id.Int64()] = true
			stack := a[k+"stack"].String()
			firstFrame, _, _ := strings.Cut(stack, "\n")
			where, _, _ := strings.Cut(firstFrame, " ")
			starts[where]++
			if where != leaked[0] && where != leaked[1] {
				t.Errorf("oldest checkout %d starts %q, want one of the leaking lines %v", i, stack, leaked)
			}
			if held := a[k+"held"].Duration(); held < 2*time.Second {
				t.Errorf("oldest checkout %d held %v, want >= 2s", i, held)
			}
		}
		if len(ids) != 2 {
			t.Errorf("the two oldest checkouts are connections %v: want two distinct connections", ids)
		}
		if starts[first] != 1 || starts[second] != 1 {
			t.Errorf("stacks start at %v; want one at each leaking line (%s, %s)", starts, first, second)
		}
		if _, ok := a["oldest.3.held"]; ok {
			t.Error("a third checkout listed; only two connections exist")
		}
		if s, _ := StatsOf(db); s.PoolExhausted != 1 {
			t.Errorf("PoolExhausted = %d, want 1", s.PoolExhausted)
		}
		cancel()
		wg.Wait()
	})
}

// monitors counts the goroutines running a connector's monitor.
func monitors() int {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "resilientpg.(*Connector).runMonitor(")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// TestMonitorOnlyWhenNeeded: the background goroutine runs only for leak
// detection or the exhaustion watch, and the watch (one db.Stats poll a
// second) only while logging is on or metrics are read (StatsOf), for a
// *sql.DB the package opened. With leak detection and logging off, an
// exhausted pool starts nothing and is not reported until StatsOf is
// called; there is never more than one goroutine per connector, and none
// after db.Close.
func TestMonitorOnlyWhenNeeded(t *testing.T) {
	cases := []struct {
		name        string
		mod         func(*Options)
		logged      bool
		foreign     bool // sql.OpenDB over NewConnector: the connector cannot read db.Stats
		atOpen      int  // monitor goroutines right after opening
		whenFull    int  // after the pool was exhausted for 2.5 s
		reported    int64
		afterStats  int // after StatsOf and 2.5 s more
		reportedNow int64
	}{
		{name: "off", atOpen: 0, whenFull: 0, reported: 0, afterStats: 1, reportedNow: 1},
		{name: "leak-detection-only", mod: func(o *Options) { o.LeakThreshold = time.Minute },
			atOpen: 0, whenFull: 1, reported: 0, afterStats: 1, reportedNow: 1},
		{name: "logging", logged: true, atOpen: 1, whenFull: 1, reported: 1, afterStats: 1, reportedNow: 1},
		{name: "logging-foreign-db", logged: true, foreign: true, atOpen: 0, whenFull: 0, reported: 0, afterStats: 0, reportedNow: 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				base := monitors()
				o := opts(tc.mod)
				if tc.logged {
					o, _ = logged(LogWarn, tc.mod)
				}
				f := &fakeConnector{shape: shapePgx}
				var db *sql.DB
				if tc.foreign {
					c, err := NewConnector(f, o)
					if err != nil {
						t.Fatal(err)
					}
					db = sql.OpenDB(c)
				} else {
					var err error
					if db, err = OpenDB(f, o); err != nil {
						t.Fatal(err)
					}
				}
				defer db.Close()
				c := connectorOf(db)
				synctest.Wait()
				if n := monitors() - base; n != tc.atOpen {
					t.Errorf("after open: %d monitor goroutines, want %d", n, tc.atOpen)
				}

				db.SetMaxOpenConns(2)
				ctx := context.Background()
				for range 2 {
					rows, err := db.QueryContext(ctx, "SELECT 1")
					if err != nil {
						t.Fatal(err)
					}
					defer rows.Close()
				}
				wctx, cancel := context.WithTimeout(ctx, time.Minute)
				defer cancel()
				var wg sync.WaitGroup
				for range 5 {
					wg.Go(func() { db.ExecContext(wctx, "SELECT 1") })
				}
				time.Sleep(2500 * time.Millisecond)
				if n := monitors() - base; n != tc.whenFull {
					t.Errorf("pool exhausted: %d monitor goroutines, want %d", n, tc.whenFull)
				}
				// c.Stats, not StatsOf: reading metrics turns the watch on.
				if got := c.Stats().PoolExhausted; got != tc.reported {
					t.Errorf("PoolExhausted = %d before any StatsOf, want %d", got, tc.reported)
				}

				if _, ok := StatsOf(db); !ok {
					t.Fatal("StatsOf: no wrapper")
				}
				time.Sleep(2500 * time.Millisecond)
				if n := monitors() - base; n != tc.afterStats {
					t.Errorf("after StatsOf: %d monitor goroutines, want %d", n, tc.afterStats)
				}
				if got := c.Stats().PoolExhausted; got != tc.reportedNow {
					t.Errorf("PoolExhausted = %d after StatsOf, want %d", got, tc.reportedNow)
				}

				cancel()
				wg.Wait()
				db.Close()
				synctest.Wait()
				if n := monitors() - base; n != 0 {
					t.Errorf("after db.Close: %d monitor goroutines, want 0", n)
				}
			})
		})
	}
}
