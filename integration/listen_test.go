package integration

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
)

// TestListenNotificationKeepsConn: a pooled connection holding a pending
// LISTEN notification has bytes waiting on its socket at checkout. The
// checkout must ping it rather than discard it, and must not consume the
// bytes: pgx still delivers the notification. resilient_ping=never shows
// the round trip comes from the pending data, not from the policy.
func TestListenNotificationKeepsConn(t *testing.T) {
	dsn := requirePostgres(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	db, err := sql.Open("resilientpg", dsn+"&resilient_ping=never")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1) // every query reuses the listening connection
	db.SetMaxIdleConns(1)
	admin, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()

	var pid, pidAfter int
	if err := db.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "LISTEN resilientpg_listen_test"); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ExecContext(ctx, "NOTIFY resilientpg_listen_test, 'hello'"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // let the notification reach the idle socket
	if err := db.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pidAfter); err != nil {
		t.Fatalf("query after the notification: %v", err)
	}
	if pidAfter != pid {
		t.Fatalf("the listening connection (pid %d) was discarded at checkout; the query ran on pid %d", pid, pidAfter)
	}
	if n := db.Stats().MaxIdleClosed + db.Stats().MaxLifetimeClosed; n != 0 {
		t.Errorf("%d connections closed", n)
	}
	sc, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	err = sc.Raw(func(dc any) error {
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Second)
		defer wcancel()
		n, err := resilientpg.UnwrapConn(dc).(*stdlib.Conn).Conn().WaitForNotification(wctx)
		if err != nil {
			return err
		}
		if n.Channel != "resilientpg_listen_test" || n.Payload != "hello" {
			t.Errorf("notification %+v, want hello on resilientpg_listen_test", n)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("the notification was lost: %v", err)
	}
}
