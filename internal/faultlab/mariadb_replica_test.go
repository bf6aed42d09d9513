package faultlab

import (
	"testing"
	"time"
)

// TestReplicaMariaDBPromote replicates a write by GTID, then fails over the
// Aurora way: old primary read-only, replica promoted, endpoint moved; a
// new connection through the endpoint then writes on the new primary, and
// one made before the move still reaches the old, read-only one.
func TestReplicaMariaDBPromote(t *testing.T) {
	requireInstalled(t, func() error { _, err := MariaDBBinaries(); return err })
	ctx := testCtx(t, 2*time.Minute)
	start := time.Now()
	r, err := StartMariaDBPair(ctx, MariaDBOptions{Logf: t.Logf})
	if err != nil {
		t.Fatalf("StartMariaDBPair: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	t.Logf("pair ready in %v", time.Since(start).Round(time.Millisecond))
	a, b := r.Node(0), r.Node(1)
	ep, err := NewEndpoint(a.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })

	db := myOpen(t, "root@tcp("+ep.Addr()+")/test")
	old := myPinned(t, ctx, db)
	if _, err := old.ExecContext(ctx, "CREATE TABLE t (id int PRIMARY KEY, srv int)"); err != nil {
		t.Fatal(err)
	}
	if _, err := old.ExecContext(ctx, "INSERT INTO t VALUES (1, @@server_id)"); err != nil {
		t.Fatal(err)
	}
	if err := r.CatchUp(ctx); err != nil {
		t.Fatal(err)
	}
	if v, err := b.queryString(ctx, "SELECT srv FROM test.t WHERE id = 1"); err != nil || v != "1" {
		t.Fatalf("replicated row: %q, %v; want written by server 1", v, err)
	}
	if err := a.SetReadOnly(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := r.CatchUp(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ep.SetTarget(b.Addr()); err != nil {
		t.Fatal(err)
	}
	if r.Primary() != b {
		t.Fatal("after Promote: node 1 is not the primary")
	}
	if _, err := old.ExecContext(ctx, "INSERT INTO t VALUES (2, @@server_id)"); myErrNumber(err) != 1290 {
		t.Fatalf("write on a connection made before the switch: %v, want error 1290", err)
	}
	fresh := myOpen(t, "root@tcp("+ep.Addr()+")/test")
	if _, err := fresh.ExecContext(ctx, "INSERT INTO t VALUES (3, @@server_id)"); err != nil {
		t.Fatalf("write through the moved endpoint: %v", err)
	}
	if v, err := b.queryString(ctx, "SELECT srv FROM test.t WHERE id = 3"); err != nil || v != "2" {
		t.Fatalf("row 3: server %q, %v; want 2", v, err)
	}
}
