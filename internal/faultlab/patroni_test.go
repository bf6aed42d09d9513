package faultlab

import (
	"testing"
	"time"
)

// TestPatroniClusterFailover starts two Patroni nodes with etcd and
// HAProxy, kills the leader's postmaster and checks that HAProxy routes
// writes to the other node, within the bounded failover time.
func TestPatroniClusterFailover(t *testing.T) {
	for _, p := range [][2]string{{"patroni", "patroni"}, {"etcd", "etcd-server"}, {"haproxy", "haproxy"}} {
		requireInstalled(t, func() error { _, err := helperBinary(p[0], p[1]); return err })
	}
	requireInstalled(t, func() error { _, err := PostgresBinDir(); return err })
	ctx := testCtx(t, 3*time.Minute)
	start := time.Now()
	c, err := StartPatroni(ctx, PatroniOptions{Logf: t.Logf})
	if err != nil {
		t.Fatalf("StartPatroni: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	t.Logf("cluster ready in %v", time.Since(start).Round(time.Millisecond))
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := leader.KillPostgres(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var up time.Duration
	for i := 0; i < 600; i++ {
		if pgWritable(ctx, c.DSN("postgres")) == nil {
			up = time.Since(killed)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if up == 0 {
		t.Fatalf("no writable primary behind HAProxy within 30 s of killing %s's postgres", leader.Name)
	}
	next, err := c.Leader(ctx)
	if err != nil || next == leader {
		t.Fatalf("after failover: leader %v, %v; want the other node", next, err)
	}
	t.Logf("killed %s's postgres; %s serves writes through HAProxy after %v", leader.Name, next.Name, up.Round(time.Millisecond))
}
