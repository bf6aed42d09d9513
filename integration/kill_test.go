package integration

import (
	"context"
	"database/sql"
	"slices"
	"sync"
	"testing"
	"time"
)

const (
	killPoolSize    = 10
	burstQueries    = 200
	burstWorkers    = 10
	burstQueryLimit = 5 * time.Second
)

// TestKillIdleSessions ends every pooled session from the server side while
// the pool holds them idle, then runs a burst of queries: the wrapper must
// hand out none of the dead connections, whether they sat idle for a while
// (a checkout ping is due) or were used a moment before the kill (no ping is
// due; only the socket check or the driver's own check can tell).
func TestKillIdleSessions(t *testing.T) {
	variants := []struct {
		name           string
		usedJustBefore bool
	}{
		{"idle-1.5s", false},
		{"used-just-before", true},
	}
	for _, e := range allEngines() {
		t.Run(e.name(), func(t *testing.T) {
			e.require(t)
			for _, v := range variants {
				t.Run(v.name, func(t *testing.T) {
					t.Run(e.wrapperDriver(), func(t *testing.T) {
						r := killScenario(t, e, e.wrapperDriver(), v.usedJustBefore)
						t.Logf("%s: %d ok, %d failed, %d answered by a killed session, %d distinct sessions answered",
							e.wrapperDriver(), r.ok, r.failed, r.killedAnswered, len(r.seen))
						if r.failed != 0 {
							t.Errorf("%d of %d queries failed after the kill, want 0; first errors: %q", r.failed, burstQueries, r.errs)
						}
						if r.ok != burstQueries {
							t.Errorf("%d queries succeeded, want %d", r.ok, burstQueries)
						}
						if r.killedAnswered != 0 {
							t.Errorf("%d queries were answered by a killed session id, want 0", r.killedAnswered)
						}
					})
					t.Run(e.bareDriver(), func(t *testing.T) {
						r := killScenario(t, e, e.bareDriver(), v.usedJustBefore)
						// Not asserted: the bare driver is the contrast.
						t.Logf("bare %s (not asserted): %d ok, %d FAILED, %d answered by a killed session; first errors: %q",
							e.bareDriver(), r.ok, r.failed, r.killedAnswered, r.errs)
					})
				})
			}
		})
	}
}

type burstResult struct {
	ok, failed     int
	killedAnswered int
	seen           map[int64]int // session id -> queries it answered
	errs           []string      // the first few errors
}

// killScenario is the scenario, written once for every engine and driver.
func killScenario(t *testing.T, e engine, driverName string, usedJustBefore bool) burstResult {
	t.Helper()
	ctx := ctxT(t, 90*time.Second)
	p := e.open(t, driverName)
	p.db.SetMaxOpenConns(killPoolSize)
	p.db.SetMaxIdleConns(killPoolSize)
	p.db.SetConnMaxLifetime(0)

	kill := e.killer(ctx, t, p, killPoolSize)

	// Warm the pool: killPoolSize connections exist and sit idle.
	ids, _ := holdAll(ctx, t, p.db, e.idQuery(), killPoolSize)

	var oldestUse time.Time
	if usedJustBefore {
		again, first := holdAll(ctx, t, p.db, e.idQuery(), killPoolSize)
		if !slices.Equal(again, ids) {
			t.Fatalf("precondition: the second round used sessions %v, want the pooled %v", again, ids)
		}
		oldestUse = first
		if age := time.Since(oldestUse); age >= 100*time.Millisecond {
			t.Fatalf("precondition: the oldest use was %v before the kill, want < 100ms", age)
		}
	} else {
		time.Sleep(1500 * time.Millisecond)
	}

	killStart := time.Now()
	kill(ids)
	t.Logf("killed %d sessions %v in %v", len(ids), ids, time.Since(killStart).Round(time.Microsecond))
	if usedJustBefore {
		// The default ping-idle threshold (and pgx's own) is 1 s: past it,
		// this variant would quietly turn into the idle one.
		if age := time.Since(oldestUse); age >= 900*time.Millisecond {
			t.Fatalf("precondition: the kill took until %v after the last use; the scenario needs < 900ms", age)
		}
	}

	killed := make(map[int64]bool, len(ids))
	for _, id := range ids {
		killed[id] = true
	}
	return burst(t, p, e.idQuery(), killed)
}

// holdAll checks out n connections at once, asks each for its session id,
// and returns them all to the pool. It returns the sorted ids and the time
// of the first query.
func holdAll(ctx context.Context, t *testing.T, db *sql.DB, idQuery string, n int) ([]int64, time.Time) {
	t.Helper()
	conns := make([]*sql.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatalf("checkout: %v", err)
		}
		conns = append(conns, c)
	}
	ids := make([]int64, 0, n)
	var first time.Time
	for i, c := range conns {
		if i == 0 {
			first = time.Now()
		}
		var id int64
		if err := c.QueryRowContext(ctx, idQuery).Scan(&id); err != nil {
			t.Fatalf("session id: %v", err)
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	if len(slices.Compact(slices.Clone(ids))) != n {
		t.Fatalf("precondition: %d connections held at once share session ids: %v", n, ids)
	}
	return ids, first
}

// burst runs burstQueries id queries on burstWorkers goroutines, each query
// bounded by burstQueryLimit and all of them by 30 s, and tallies the
// outcome.
func burst(t *testing.T, p *pool, idQuery string, killed map[int64]bool) burstResult {
	t.Helper()
	db := p.db
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := burstResult{seen: map[int64]int{}}
	var mu sync.Mutex
	jobs := make(chan struct{}, burstQueries)
	for range burstQueries {
		jobs <- struct{}{}
	}
	close(jobs)
	var wg sync.WaitGroup
	for range burstWorkers {
		wg.Go(func() {
			for range jobs {
				qctx, cancel := context.WithTimeout(ctx, burstQueryLimit)
				var id int64
				err := db.QueryRowContext(qctx, idQuery).Scan(&id)
				cancel()
				mu.Lock()
				if err != nil {
					r.failed++
					if len(r.errs) < 3 {
						r.errs = append(r.errs, err.Error())
					}
				} else {
					r.ok++
					r.seen[id]++
					if killed[id] {
						r.killedAnswered++
					}
				}
				mu.Unlock()
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	awaitWorkers(t, done, 40*time.Second, p)
	mu.Lock()
	defer mu.Unlock()
	return r
}
