package examples

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// killPool fills db's pool (poolSize connections held at once, each used,
// then released), ends every session of the test server-side, and waits
// settleAfter. It fails the test unless at least poolSize sessions died.
func killPool(t *testing.T, tg target, db *sql.DB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conns := make([]*sql.Conn, 0, poolSize)
	for range poolSize {
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatalf("fill pool: %v", err)
		}
		conns = append(conns, c)
		if _, err := c.ExecContext(ctx, "SELECT 1"); err != nil {
			t.Fatalf("fill pool: %v", err)
		}
	}
	for _, c := range conns {
		c.Close()
	}
	n := tg.killSessions(t, ctx)
	if n < poolSize {
		t.Fatalf("killed %d sessions, want at least the %d pooled ones", n, poolSize)
	}
	time.Sleep(settleAfter)
}

// killSessions ends the test's sessions and waits until they are gone.
func (tg target) killSessions(t *testing.T, ctx context.Context) int {
	t.Helper()
	if !tg.mysql {
		admin, err := sql.Open("pgx", tg.adminDSN)
		if err != nil {
			t.Fatal(err)
		}
		defer admin.Close()
		var n int
		// The two-argument form waits up to 5 s for each backend to exit.
		err = admin.QueryRowContext(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))
			FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()`, tg.tag).Scan(&n)
		if err != nil {
			t.Fatalf("pg_terminate_backend: %v", err)
		}
		return n
	}
	admin, err := sql.Open("mysql", tg.adminDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ids, err := processIDs(ctx, admin, tg.tag)
	if err != nil {
		t.Fatalf("processlist: %v", err)
	}
	for _, id := range ids {
		_, err := admin.ExecContext(ctx, fmt.Sprintf("KILL CONNECTION %d", id))
		var me *mysql.MySQLError
		if err != nil && !(errors.As(err, &me) && me.Number == 1094) { // 1094: already gone
			t.Fatalf("KILL %d: %v", id, err)
		}
	}
	// KILL only flags the thread: wait until the sessions have left.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		left, err := processIDs(ctx, admin, tg.tag)
		if err != nil {
			t.Fatalf("processlist: %v", err)
		}
		if len(left) == 0 {
			return len(ids)
		}
		if time.Now().After(deadline) {
			t.Fatalf("killed sessions still listed after 10 s: %v", left)
		}
	}
}

func processIDs(ctx context.Context, db *sql.DB, dbName string) ([]int64, error) {
	rows, err := db.QueryContext(ctx,
		"SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()", dbName)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// burst runs burstOps operations on burstConc workers, each bounded by
// opTimeout, and fails the test unless every one succeeded.
func burst(t *testing.T, what string, op func(ctx context.Context, i int) error) {
	t.Helper()
	ok, fails, errs := runBurst(op)
	t.Logf("%s after killing every pooled session: %d of %d operations ok, %d failed", what, ok, burstOps, fails)
	if fails != 0 {
		t.Errorf("%s: %d of %d operations failed after the kill, want 0; first errors: %q", what, fails, burstOps, errs)
	}
}

// runBurst runs the operations and tallies them; errs holds the first few.
func runBurst(op func(ctx context.Context, i int) error) (ok, fails int, errs []string) {
	var (
		next atomic.Int64
		mu   sync.Mutex
		wg   sync.WaitGroup
	)
	for range burstConc {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < burstOps; i = int(next.Add(1)) - 1 {
				ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
				err := op(ctx, i)
				cancel()
				mu.Lock()
				if err != nil {
					fails++
					if len(errs) < 3 {
						errs = append(errs, fmt.Sprintf("op %d: %v", i, err))
					}
				} else {
					ok++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return ok, fails, errs
}

// proveAfterKill is killPool followed by burst.
func proveAfterKill(t *testing.T, tg target, db *sql.DB, what string, op func(ctx context.Context, i int) error) {
	t.Helper()
	killPool(t, tg, db)
	burst(t, what, op)
}

// ctxT is a context for a test's setup steps.
func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
