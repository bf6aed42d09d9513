package faultlab

import (
	"context"
	"strconv"
	"testing"
	"time"
)

// TestStandbyPromoteRejoin walks a pair through a crash failover and back
// to two nodes: a commit acknowledged by the primary is on the standby, the
// standby refuses writes until promoted, and the crashed primary rejoins as
// a standby of the new one and receives its writes.
func TestStandbyPromoteRejoin(t *testing.T) {
	requireInstalled(t, func() error { _, err := PostgresBinDir(); return err })
	ctx := testCtx(t, 2*time.Minute)
	start := time.Now()
	r, err := StartPGPair(ctx, PostgresOptions{Logf: t.Logf})
	if err != nil {
		t.Fatalf("StartPGPair: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	t.Logf("pair %s -> %s ready in %v", r.Node(0).Addr(), r.Node(1).Addr(), time.Since(start).Round(time.Millisecond))
	a, b := r.Node(0), r.Node(1)
	if r.Primary() != a || r.Standby() != b {
		t.Fatal("roles: want node 0 primary, node 1 standby")
	}
	mustExec(t, ctx, a, "CREATE TABLE t (id int)")
	mustExec(t, ctx, a, "INSERT INTO t VALUES (1)")
	// Synchronous replication: the acknowledged row is on the standby
	// already (remote_apply is not asked for, so allow a moment to replay).
	waitCount(t, ctx, b, 1)
	if err := b.Exec(ctx, "INSERT INTO t VALUES (2)"); sqlState(err) != "25006" {
		t.Fatalf("write on the standby: %v, want SQLSTATE 25006", err)
	}

	if err := a.Stop(StopImmediate); err != nil {
		t.Fatal(err)
	}
	p0 := time.Now()
	if err := r.Promote(ctx); err != nil {
		t.Fatalf("Promote: %v", err)
	}
	t.Logf("promoted %s in %v", b.Addr(), time.Since(p0).Round(time.Millisecond))
	if r.Primary() != b {
		t.Fatal("after Promote: node 1 is not the primary")
	}
	mustExec(t, ctx, b, "INSERT INTO t VALUES (3)")

	r0 := time.Now()
	if err := r.Rejoin(ctx); err != nil {
		t.Fatalf("Rejoin: %v", err)
	}
	t.Logf("rejoined %s in %v", a.Addr(), time.Since(r0).Round(time.Millisecond))
	if rec, err := a.InRecovery(ctx); err != nil || !rec {
		t.Fatalf("old primary after Rejoin: in recovery %v, %v; want a standby", rec, err)
	}
	if a.Port == b.Port {
		t.Fatal("pg_rewind's copied configuration gave both nodes one port")
	}
	mustExec(t, ctx, b, "INSERT INTO t VALUES (4)")
	waitCount(t, ctx, a, 3)

	// A planned switchover back: stop the primary, promote, rejoin.
	if err := b.Stop(StopFast); err != nil {
		t.Fatal(err)
	}
	if err := r.Promote(ctx); err != nil {
		t.Fatalf("second Promote: %v", err)
	}
	if err := r.Rejoin(ctx); err != nil {
		t.Fatalf("second Rejoin: %v", err)
	}
	mustExec(t, ctx, a, "INSERT INTO t VALUES (5)")
	waitCount(t, ctx, b, 4)
}

func mustExec(t *testing.T, ctx context.Context, p *Postgres, q string) {
	t.Helper()
	if err := p.Exec(ctx, q); err != nil {
		t.Fatal(err)
	}
}

// waitCount waits up to 5 s for table t on p to hold n rows.
func waitCount(t *testing.T, ctx context.Context, p *Postgres, n int) {
	t.Helper()
	var got string
	for i := 0; i < 250; i++ {
		v, err := p.queryString(ctx, "SELECT count(*)::text FROM t")
		if err == nil && v == strconv.Itoa(n) {
			return
		}
		got = v
		if err != nil {
			got = err.Error()
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: count(*) = %s, want %d", p.Addr(), got, n)
}
