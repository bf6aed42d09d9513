package main

import (
	"context"
	"database/sql"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// result counts what an application saw during one phase.
type result struct {
	ops, failed int64
	lat         []time.Duration
	firstErr    string
}

func (r *result) p99() time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	s := slices.Clone(r.lat)
	slices.Sort(s)
	return s[(len(s)*99+99)/100-1] // the nearest-rank percentile
}

// recorder collects results from concurrent workers.
type recorder struct {
	mu    sync.Mutex
	r     result
	count atomic.Int64 // for the progress line
	fails atomic.Int64
}

func (rec *recorder) add(d time.Duration, err error) {
	rec.count.Add(1)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.r.ops++
	rec.r.lat = append(rec.r.lat, d)
	if err != nil {
		rec.fails.Add(1)
		rec.r.failed++
		if rec.r.firstErr == "" {
			rec.r.firstErr = err.Error()
		}
	}
}

func (rec *recorder) result() result {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return rec.r
}

// one runs SELECT 1 with its own deadline, as a request handler would.
func one(db *sql.DB, timeout time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	var n int
	err := db.QueryRowContext(ctx, "SELECT 1").Scan(&n)
	return time.Since(start), err
}

// burst runs total queries at the given concurrency.
func burst(db *sql.DB, rec *recorder, total, conc int, timeout time.Duration) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for next.Add(1) <= int64(total) {
				rec.add(one(db, timeout))
			}
		})
	}
	wg.Wait()
}

// steady runs workers back to back until stop closes.
func steady(db *sql.DB, rec *recorder, workers int, timeout time.Duration, stop <-chan struct{}) {
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				rec.add(one(db, timeout))
			}
		})
	}
	wg.Wait()
}

// warm makes the pool hold n connections that have each run a query.
func warm(ctx context.Context, db *sql.DB, n int) error {
	conns := make([]*sql.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := db.Conn(ctx)
		if err != nil {
			return err
		}
		conns = append(conns, c)
		if _, err := c.ExecContext(ctx, "SELECT 1"); err != nil {
			return err
		}
	}
	return nil
}
