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
		var leaked []string
		for range 2 {
			leaked = append(leaked, nextLine())
			rows, err := db.QueryContext(ctx, "SELECT 1")
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
		}
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
		for i := 1; i <= 2; i++ {
			stack := a["oldest."+strconv.Itoa(i)+".stack"].String()
			if !strings.HasPrefix(stack, leaked[0]+" ") && !strings.HasPrefix(stack, leaked[1]+" ") {
				t.Errorf("oldest checkout %d starts %q, want one of the leaking lines %v", i, stack, leaked)
			}
			if held := a["oldest."+strconv.Itoa(i)+".held"].Duration(); held < 2*time.Second {
				t.Errorf("oldest checkout %d held %v, want >= 2s", i, held)
			}
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
