package integration

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCheckoutNeverBlocksOnPgconnReader is the regression test for a hang
// the suite found: when a pgx write takes longer than 15 ms (here: CPU
// starvation; in production also a large query or COPY on a slow link),
// pgconn starts a background reader goroutine, which can stay parked in
// net.Conn.Read on the idle connection, holding the descriptor's read lock.
// A checkout peek through RawConn.Read waited for that lock until the
// server sent something; the peek now runs under RawConn.Control. It
// hammers a pool with short queries while other goroutines burn CPU, and
// fails if any query outlives its own 2 s timeout by 5 s (before the fix:
// 8 of about 15,000 did, on every run).
func TestCheckoutNeverBlocksOnPgconnReader(t *testing.T) {
	e := pgEngine{}
	e.require(t)
	if slow := hammerUnderCPUStarvation(t, e.open(t, "resilientpg")); slow > 0 {
		t.Errorf("%d queries ignored their context", slow)
	}
}

// hammerUnderCPUStarvation runs 32 workers of back-to-back queries on an
// 8-connection pool while 2*GOMAXPROCS goroutines spin, for 8 s, and
// returns how many queries outlived their 2 s timeout by more than 5 s.
func hammerUnderCPUStarvation(t *testing.T, p *pool) int64 {
	t.Helper()
	p.db.SetMaxOpenConns(8)
	p.db.SetMaxIdleConns(8)

	const run = 8 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), run)
	defer cancel()

	var stop atomic.Bool
	var burners sync.WaitGroup
	for range 2 * runtime.GOMAXPROCS(0) {
		burners.Go(func() {
			x := 0
			for i := 0; !stop.Load() && i < 1<<40; i++ {
				x += i
			}
			_ = x
		})
	}
	defer func() { stop.Store(true); burners.Wait() }()

	var queries, slow atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for i := 0; i < 1_000_000 && ctx.Err() == nil; i++ {
				qctx, qcancel := context.WithTimeout(ctx, 2*time.Second)
				start := time.Now()
				var pid int64
				_ = p.db.QueryRowContext(qctx, "SELECT pg_backend_pid()").Scan(&pid)
				qcancel()
				queries.Add(1)
				if time.Since(start) > 7*time.Second {
					slow.Add(1)
				}
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	awaitWorkers(t, done, run+7*time.Second, p)
	t.Logf("%d queries, %d outlived their 2 s timeout by more than 5 s", queries.Load(), slow.Load())
	return slow.Load()
}
