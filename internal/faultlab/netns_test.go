package faultlab

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
)

// newTestNetns creates a namespace or skips outside CI when the machine
// cannot (not root, no iptables); in CI that is a failure.
func newTestNetns(t *testing.T) *Netns {
	t.Helper()
	ctx := testCtx(t, 30*time.Second)
	n, err := NewNetns(ctx, t.Logf)
	if err != nil {
		if errors.Is(err, ErrNoNetns) && os.Getenv("CI") == "" {
			t.Skipf("skipping: %v (run as root with bash .ci/setup done, or set CI=1 to make this a failure)", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("close namespace: %v", err)
		}
		assertNetnsGone(t, n)
	})
	return n
}

// assertNetnsGone checks that Close left neither the namespace nor the
// veth end in this namespace behind.
func assertNetnsGone(t *testing.T, n *Netns) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := runCmd(ctx, "ip", "netns", "list")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, n.Name) {
		t.Errorf("namespace %s still listed after Close", n.Name)
	}
	if linkExists(ctx, n.hostIf) {
		t.Errorf("veth %s still present after Close", n.hostIf)
	}
}

// TestNetnsPostgresFaults starts PostgreSQL inside a namespace and shows
// each kernel fault on a real connection: a dropped flow times out (no
// error arrives by itself), a reset flow fails at once, new connections
// pass both, and a dropped port stalls new connections until Heal.
func TestNetnsPostgresFaults(t *testing.T) {
	requireInstalled(t, func() error { _, err := PostgresBinDir(); return err })
	n := newTestNetns(t)
	ctx := testCtx(t, 2*time.Minute)
	pg, err := StartPostgres(ctx, PostgresOptions{Logf: t.Logf, Netns: n})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Close() }) // before the namespace's Close (LIFO)
	if !strings.HasPrefix(pg.Addr(), n.ServerIP+":") {
		t.Fatalf("Addr %s, want on %s", pg.Addr(), n.ServerIP)
	}
	connect := func() *pgx.Conn {
		t.Helper()
		c, err := pgx.Connect(ctx, pg.DSN("test")+"&connect_timeout=5")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		return c
	}
	// The server sees the client coming from the namespace's other end:
	// the traffic really crosses the veth pair.
	a := connect()
	var addr string
	if err := a.QueryRow(ctx, "SELECT host(inet_client_addr())").Scan(&addr); err != nil {
		t.Fatal(err)
	}
	if addr != n.HostIP {
		t.Fatalf("server sees client address %s, want %s", addr, n.HostIP)
	}
	b := connect()

	// Drop a's and b's flows: a's query gets no answer and no error.
	cut, err := n.DropFlows(ctx, pg.Port)
	if err != nil {
		t.Fatal(err)
	}
	if cut != 2 {
		t.Fatalf("DropFlows cut %d flows, want 2", cut)
	}
	qctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = a.Exec(qctx, "SELECT 1")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) && !pgconnTimeout(err) {
		t.Fatalf("query on a dropped flow: %v, want the deadline", err)
	}
	// A new connection passes; the admin socket is untouched.
	c := connect()
	if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("new connection after DropFlows: %v", err)
	}
	if err := pg.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("admin over the socket: %v", err)
	}

	// Reset c's flow: its next statement fails at once (pgx reports the
	// reset it read as "conn closed").
	if cut, err := n.ResetFlows(ctx, pg.Port); err != nil || cut < 1 {
		t.Fatalf("ResetFlows: %d, %v", cut, err)
	}
	start := time.Now()
	_, err = c.Exec(ctx, "SELECT 1")
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("statement on a reset flow: %v, want a failure", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("reset took %v to surface", d)
	}

	// Heal: the dropped flow b resumes (nothing was lost, only delayed).
	if err := n.Heal(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("dropped flow after Heal: %v", err)
	}

	// DropPort: new connections stall (no refusal) until Heal.
	if err := n.DropPort(ctx, pg.Port); err != nil {
		t.Fatal(err)
	}
	dctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = pgx.Connect(dctx, pg.DSN("test"))
	cancel()
	if err == nil || errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("connect through a dropped port: %v, want a timeout", err)
	}
	if err := n.ResetPort(ctx, pg.Port); err != nil {
		t.Fatal(err)
	}
	if err := n.Heal(ctx); err != nil {
		t.Fatal(err)
	}
	connect()
}

func pgconnTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestNetnsMariaDB starts MariaDB inside a namespace: root logs in over
// TCP from the namespace's other end, and a reset flow fails at once.
func TestNetnsMariaDB(t *testing.T) {
	requireInstalled(t, func() error { _, err := MariaDBBinaries(); return err })
	n := newTestNetns(t)
	ctx := testCtx(t, 2*time.Minute)
	m, err := StartMariaDB(ctx, MariaDBOptions{Logf: t.Logf, Netns: n})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	db, err := sql.Open("mysql", m.DSN("test"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// The test holds one connection across the reset. Taken from the pool
	// after the reset instead, the driver's liveness check in ResetSession
	// may already have read the RST (the client's delayed ACK draws it) and
	// handed out a fresh connection, and then nothing would be tested.
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var host string
	if err := conn.QueryRowContext(ctx, "SELECT SUBSTRING_INDEX(HOST, ':', 1) FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()").Scan(&host); err != nil {
		t.Fatal(err)
	}
	if host != n.HostIP {
		t.Fatalf("server sees client host %s, want %s", host, n.HostIP)
	}
	if cut, err := n.ResetFlows(ctx, m.Port); err != nil || cut != 1 {
		t.Fatalf("ResetFlows: %d, %v", cut, err)
	}
	// The driver reports the reset: as ECONNRESET or EPIPE, or as
	// ErrInvalidConn or driver.ErrBadConn, which it maps them to. A hang
	// would end only with the test's context.
	err = conn.PingContext(ctx)
	if err == nil {
		t.Fatal("ping on a reset flow succeeded")
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ping on a reset flow hung: %v", err)
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) &&
		!errors.Is(err, mysql.ErrInvalidConn) && !errors.Is(err, driver.ErrBadConn) {
		t.Fatalf("ping on a reset flow: %v", err)
	}
	if err := m.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("admin over the socket: %v", err)
	}
}
