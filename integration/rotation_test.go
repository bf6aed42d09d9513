package integration

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

const (
	rotationPool     = 10
	rotationMaxAge   = 2 * time.Second
	rotationJitter   = rotationMaxAge / 10 // the default 10%
	rotationRun      = 6 * time.Second
	rotationFirstGen = 200 * time.Millisecond
)

// TestMaxAgeRotation runs a saturated pool of connections opened together
// with resilient_max_age=2s: each must be replaced between 1.8 s and 2 s
// (plus scheduling slack), without a single failed query, and the
// replacements must be spread over time rather than all at once.
func TestMaxAgeRotation(t *testing.T) {
	for _, e := range allEngines() {
		t.Run(e.name(), func(t *testing.T) {
			e.require(t)
			t.Run(e.wrapperDriver(), func(t *testing.T) {
				p := e.open(t, e.wrapperDriver(), "resilient_max_age="+rotationMaxAge.String())
				r := rotate(t, p, e.idQuery())
				t.Logf("%s: %d queries, %d failed; pool opened in %v; first generation %d sessions, retired %v..%v after start, SPREAD %v; %d later sessions",
					e.wrapperDriver(), r.queries, r.failed, r.warm, len(r.firstGen), r.minLast, r.maxLast, r.spread(), r.later)
				if r.failed != 0 {
					t.Errorf("%d queries failed, want 0; first errors: %q", r.failed, r.errs)
				}
				if len(r.firstGen) != rotationPool {
					t.Errorf("%d sessions seen in the first %v after the pool was opened, want the whole pool, %d", len(r.firstGen), rotationFirstGen, rotationPool)
				}
				// Deadline = connect + max age - U[0, jitter]; the last query
				// on a connection ends at most a query's time after it.
				upper := r.warm + rotationMaxAge + time.Second
				lower := rotationMaxAge - rotationJitter - 300*time.Millisecond // the 300ms is scheduling slack
				for _, s := range r.firstGen {
					if s.last > upper {
						t.Errorf("session %d answered %v after start, want it replaced by %v", s.id, s.last, upper)
					}
					if s.last < lower {
						t.Errorf("session %d was last seen %v after start: replaced before max age minus jitter (%v)", s.id, s.last, lower)
					}
				}
				if r.later < rotationPool {
					t.Errorf("%d new sessions appeared after the first %v, want at least %d", r.later, rotationFirstGen, rotationPool)
				}
				if r.spread() < 50*time.Millisecond {
					t.Errorf("the first generation was replaced within %v, want a spread >= 50ms (jitter %v)", r.spread(), rotationJitter)
				}
			})
			t.Run(e.bareDriver()+"+SetConnMaxLifetime", func(t *testing.T) {
				p := e.open(t, e.bareDriver())
				p.db.SetConnMaxLifetime(rotationMaxAge)
				r := rotate(t, p, e.idQuery())
				// Not asserted: the contrast.
				t.Logf("bare %s (not asserted): %d queries, %d failed; first generation %d sessions, retired %v..%v after start, SPREAD %v; %d later sessions",
					e.bareDriver(), r.queries, r.failed, len(r.firstGen), r.minLast, r.maxLast, r.spread(), r.later)
			})
		})
	}
}

type session struct {
	id          int64
	first, last time.Duration // since start
}

type rotation struct {
	queries, failed  int
	errs             []string
	firstGen         []session // first seen within rotationFirstGen
	later            int       // sessions first seen after that
	minLast, maxLast time.Duration
	warm             time.Duration // opening the pool's connections took this, from start
}

func (r rotation) spread() time.Duration { return r.maxLast - r.minLast }

// rotate runs rotationPool workers issuing idQuery back to back for
// rotationRun (and at most 100000 queries each), recording when each
// session id was first and last seen.
func rotate(t *testing.T, p *pool, idQuery string) rotation {
	t.Helper()
	db := p.db
	db.SetMaxOpenConns(rotationPool)
	db.SetMaxIdleConns(rotationPool)
	ctx := ctxT(t, rotationRun+30*time.Second)

	var (
		mu       sync.Mutex
		sessions = map[int64]*session{}
		r        rotation
		wg       sync.WaitGroup
	)
	// The pool's connections are opened together first, so that they share
	// one age: on a loaded 2-core machine, ten connects made as the load
	// starts need longer than rotationFirstGen. Ages count from start.
	start := time.Now()
	conns := make([]*sql.Conn, rotationPool)
	for i := range conns {
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatalf("precondition: opening the pool: %v", err)
		}
		conns[i] = c
	}
	for _, c := range conns {
		c.Close()
	}
	r.warm = time.Since(start)
	stop := start.Add(rotationRun)
	for range rotationPool {
		wg.Go(func() {
			for i := 0; i < 100000 && time.Now().Before(stop); i++ {
				qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				var id int64
				err := db.QueryRowContext(qctx, idQuery).Scan(&id)
				cancel()
				at := time.Since(start)
				mu.Lock()
				r.queries++
				if err != nil {
					r.failed++
					if len(r.errs) < 3 {
						r.errs = append(r.errs, err.Error())
					}
				} else if s := sessions[id]; s != nil {
					s.last = at
				} else {
					sessions[id] = &session{id: id, first: at, last: at}
				}
				mu.Unlock()
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	awaitWorkers(t, done, rotationRun+15*time.Second, p)

	mu.Lock()
	defer mu.Unlock()
	for _, s := range sessions {
		if s.first < r.warm+rotationFirstGen {
			r.firstGen = append(r.firstGen, *s)
		} else {
			r.later++
		}
	}
	slices.SortFunc(r.firstGen, func(a, b session) int { return int(a.last - b.last) })
	if len(r.firstGen) > 0 {
		r.minLast, r.maxLast = r.firstGen[0].last, r.firstGen[len(r.firstGen)-1].last
	}
	var b []byte
	for _, s := range r.firstGen {
		b = fmt.Appendf(b, " %d:%v", s.id, s.last.Round(time.Millisecond))
	}
	t.Logf("first generation, last seen after start:%s", b)
	return r
}
