package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
)

// benchDrivers are compared side by side: pgx alone, and pgx wrapped.
var benchDrivers = []string{"pgx", "resilientpg"}

// openBenchDB opens a pool whose idle list is large enough that every
// operation reuses a pooled connection (a checkout, hence ResetSession, on
// each one), and warms it.
func openBenchDB(b *testing.B, driverName, dsn string) *sql.DB {
	b.Helper()
	db := openDB(b, driverName, dsn)
	n := 4 * runtime.GOMAXPROCS(0)
	db.SetMaxOpenConns(n)
	db.SetMaxIdleConns(n)
	if err := db.PingContext(context.Background()); err != nil {
		b.Fatal(err)
	}
	return db
}

func BenchmarkQueryRow(b *testing.B) {
	dsn := requirePostgres(b)
	for _, d := range benchDrivers {
		b.Run(d, func(b *testing.B) {
			db := openBenchDB(b, d, dsn)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				var n int
				if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&n); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// pairs records interleaved query timings: each pair is one query on the
// bare pool and one on the wrapped pool, in alternating order so neither
// always goes first. Not safe for concurrent use: one per goroutine.
type pairs struct {
	bare, wrapped *sql.DB
	op            func(ctx context.Context, db *sql.DB) error // nil: SELECT 1
	bareTimes     []time.Duration
	diffs         []time.Duration // wrapped minus bare, per pair
}

func selectOneOp(ctx context.Context, db *sql.DB) error {
	var n int
	return db.QueryRowContext(ctx, "SELECT 1").Scan(&n)
}

// txOp is a transaction of one statement, through the wrapper's guard.
func txOp(ctx context.Context, db *sql.DB) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT 1").Scan(&n); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

func (p *pairs) run(tb testing.TB, i int) {
	ctx := context.Background()
	op := p.op
	if op == nil {
		op = selectOneOp
	}
	query := func(db *sql.DB) time.Duration {
		start := time.Now()
		if err := op(ctx, db); err != nil {
			tb.Error(err)
		}
		return time.Since(start)
	}
	var tBare, tWrapped time.Duration
	if i%2 == 0 {
		tBare, tWrapped = query(p.bare), query(p.wrapped)
	} else {
		tWrapped, tBare = query(p.wrapped), query(p.bare)
	}
	p.bareTimes = append(p.bareTimes, tBare)
	p.diffs = append(p.diffs, tWrapped-tBare)
}

// report gives the wrapper's cost per query as the median of the pairwise
// differences (overhead-ns) and as a share of the median bare query
// (overhead-%). Medians, because a scheduling hiccup of milliseconds on one
// side of a pair would swamp a sum.
func (p *pairs) report(b *testing.B) {
	medBare, medDiff := median(p.bareTimes), median(p.diffs)
	b.ReportMetric(float64(medDiff), "overhead-ns")
	b.ReportMetric(100*float64(medDiff)/float64(medBare), "overhead-%")
}

func newPairs(b *testing.B) *pairs {
	dsn := requirePostgres(b)
	return &pairs{bare: openBenchDB(b, "pgx", dsn), wrapped: openBenchDB(b, "resilientpg", dsn)}
}

// BenchmarkQueryRowInterleaved alternates bare pgx and resilientpg query by
// query, so drift and noise on a shared machine hit both alike. The
// separate benchmarks above cannot resolve a 1 % difference: their
// run-to-run spread is about 15 %.
func BenchmarkQueryRowInterleaved(b *testing.B) {
	p := newPairs(b)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		p.run(b, i)
	}
	p.report(b)
}

// BenchmarkQueryRowParallelInterleaved is the interleaved comparison under
// concurrency: every goroutine alternates the two pools query by query.
// The plain parallel benchmarks swing between 12 and 37 µs per query from
// run to run on a 2-CPU machine that also runs the server.
func BenchmarkQueryRowParallelInterleaved(b *testing.B) {
	all := newPairs(b)
	var mu sync.Mutex
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		mine := &pairs{bare: all.bare, wrapped: all.wrapped}
		for i := 0; pb.Next(); i++ {
			mine.run(b, i)
		}
		mu.Lock()
		all.bareTimes = append(all.bareTimes, mine.bareTimes...)
		all.diffs = append(all.diffs, mine.diffs...)
		mu.Unlock()
	})
	all.report(b)
}

// BenchmarkTxInterleaved is the interleaved comparison for a transaction
// (BEGIN, SELECT 1, COMMIT): the cost of the transaction guard, including
// its socket check before COMMIT.
func BenchmarkTxInterleaved(b *testing.B) {
	p := newPairs(b)
	p.op = txOp
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		p.run(b, i)
	}
	p.report(b)
}

// BenchmarkTx measures the transaction alone per driver, for allocs/op.
func BenchmarkTx(b *testing.B) {
	dsn := requirePostgres(b)
	for _, d := range benchDrivers {
		b.Run(d, func(b *testing.B) {
			db := openBenchDB(b, d, dsn)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if err := txOp(ctx, db); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func median(d []time.Duration) time.Duration {
	slices.Sort(d)
	return d[len(d)/2]
}

func BenchmarkExec(b *testing.B) {
	dsn := requirePostgres(b)
	for _, d := range benchDrivers {
		b.Run(d, func(b *testing.B) {
			db := openBenchDB(b, d, dsn)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := db.ExecContext(ctx, "SELECT 1"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkQueryRowParallel(b *testing.B) {
	dsn := requirePostgres(b)
	for _, d := range benchDrivers {
		b.Run(d, func(b *testing.B) {
			db := openBenchDB(b, d, dsn)
			ctx := context.Background()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					var n int
					if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&n); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// resetSessionOnUsedConn checks out one connection, uses it, and hands the
// driver conn (the wrapper, or bare pgx's) to f inside sql.Conn.Raw, which
// holds the connection's lock as database/sql does around ResetSession.
func resetSessionOnUsedConn(tb testing.TB, driverName string, f func(r driver.SessionResetter)) {
	tb.Helper()
	dsn := requirePostgres(tb)
	db := openDB(tb, driverName, dsn)
	ctx := context.Background()
	sc, err := db.Conn(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	defer sc.Close()
	var one int
	if err := sc.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		tb.Fatal(err)
	}
	err = sc.Raw(func(dc any) error {
		r, ok := dc.(driver.SessionResetter)
		if !ok {
			return errors.New("driver conn is not a driver.SessionResetter")
		}
		f(r)
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkResetSessionFastPath measures a checkout of a connection used a
// moment ago (no ping due): for the wrapper, the age and idle checks, the
// socket peek and pgx's own reset.
func BenchmarkResetSessionFastPath(b *testing.B) {
	for _, d := range benchDrivers {
		b.Run(d, func(b *testing.B) {
			resetSessionOnUsedConn(b, d, func(r driver.SessionResetter) {
				ctx := context.Background()
				b.ReportAllocs()
				for b.Loop() {
					if err := r.ResetSession(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// TestResetSessionFastPathAllocs asserts that the wrapper's checkout of a
// healthy, recently used connection allocates nothing, on a real pgx conn
// with a real socket to peek at. It then terminates that very backend and
// checks that the same call, still with no ping due, now discards the conn:
// the path measured did look at the socket.
func TestResetSessionFastPathAllocs(t *testing.T) {
	e := pgEngine{}
	e.require(t)
	ctx := ctxT(t, 30*time.Second)
	p := e.open(t, "resilientpg")
	kill := e.killer(ctx, t, p, 1)
	sc, err := p.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	var pid int64
	if err := sc.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	withResetter := func(f func(r driver.SessionResetter)) {
		t.Helper()
		err := sc.Raw(func(dc any) error {
			r, ok := dc.(driver.SessionResetter)
			if !ok {
				return fmt.Errorf("driver conn %T is not a driver.SessionResetter", dc)
			}
			if _, ok := resilientpg.UnwrapConn(dc).(*stdlib.Conn); !ok {
				return fmt.Errorf("inner conn is a %T, want a real *stdlib.Conn", resilientpg.UnwrapConn(dc))
			}
			f(r)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	withResetter(func(r driver.SessionResetter) {
		bg := context.Background()
		var err error
		allocs := testing.AllocsPerRun(1000, func() {
			if e := r.ResetSession(bg); e != nil && err == nil {
				err = e
			}
		})
		if err != nil {
			t.Fatalf("ResetSession on a healthy conn: %v", err)
		}
		if allocs != 0 {
			t.Errorf("ResetSession fast path: %v allocs/op, want 0", allocs)
		}
	})

	kill([]int64{pid})
	withResetter(func(r driver.SessionResetter) {
		err := r.ResetSession(context.Background())
		if !errors.Is(err, driver.ErrBadConn) {
			t.Fatalf("ResetSession after pg_terminate_backend = %v, want an error wrapping driver.ErrBadConn", err)
		}
		t.Logf("after pg_terminate_backend(%d): %v", pid, err)
	})
}
