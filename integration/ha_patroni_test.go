package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// TestPatroniLeaderKill kills the Patroni leader's postmaster (kill -9)
// under write load through HAProxy. Patroni (primary_start_timeout 0,
// synchronous_mode) fails over to the synchronous replica and HAProxy's
// /primary check follows. Goals: only writes in flight fail (at most one
// per worker); success again within 1 s of the failover (a fresh session
// through HAProxy reaching a primary), although HAProxy answers every
// connect meanwhile by closing it (a refusal: probed every
// resilient_probe_interval); every acknowledged write on the new leader
// exactly once.
func TestPatroniLeaderKill(t *testing.T) {
	start := time.Now()
	c, err := faultlab.StartPatroni(topoCtx(t), faultlab.PatroniOptions{Logf: t.Logf})
	requireTopology(t, "Patroni cluster (etcd, 2 nodes, HAProxy)", err)
	t.Cleanup(func() { c.Close() })
	t.Logf("patroni cluster ready in %v", time.Since(start).Round(time.Millisecond))
	haExec(t, haPG, c.DSN("postgres"), "CREATE DATABASE test_ha")
	dsn := c.DSN("test_ha")
	haExec(t, haPG, dsn, haPG.haCreateSQL())
	haExec(t, haPG, dsn, "CREATE TABLE ha_up (at timestamptz NOT NULL)")

	env := newHAEnv(t, haPG)
	// HAProxy's /primary check lags a role change by up to its interval,
	// and meanwhile routes to a node that is no longer (or not yet) the
	// primary: target_session_attrs=read-write makes each connect check,
	// and turns on the wrapper's read-only rejection (both pools get it).
	ps := env.haPools(dsn+"&target_session_attrs=read-write", dsn+"&target_session_attrs=read-write")
	env.warm(ps, "SELECT 1")
	leader, err := c.Leader(env.ctx)
	if err != nil {
		t.Fatal(err)
	}
	halt := env.load(ps, scLoadWorkers, scMaxOps, env.haInsert)
	env.sleepUntil(scFaultAt)
	killAt := env.now()
	if err := leader.KillPostgres(); err != nil {
		t.Fatal(err)
	}
	upCh := watchProbe(env.ctx, env.t0, func(ctx context.Context) error { return writableThrough(ctx, dsn) })
	up := <-upCh
	if up < 0 {
		halt()
		t.Fatalf("no writable primary behind HAProxy within 30 s of killing %s's postgres", leader.Name)
	}
	env.sleepUntil(up + scAfterUp)
	halt()
	next, err := c.Leader(env.ctx)
	if err != nil || next == leader {
		t.Fatalf("after the kill: leader %v, %v; want the other node", next, err)
	}
	failover := up - killAt
	t.Logf("killed %s's postmaster at %v; %s writable through HAProxy at %v (failover %v)",
		leader.Name, fmtDur(killAt), next.Name, fmtDur(up), fmtDur(failover))
	for _, p := range ps {
		s := haStatsOf(p, killAt, up, up, killAt)
		w := env.haCheckRows(p, next.DSN("test_ha"))
		s.firstOK = firstOn(p, w, int64(next.Port))
		first := "none"
		if s.firstOK >= 0 {
			first = "up+" + (s.firstOK - up).Round(time.Millisecond).String()
		}
		env.haLog("patroni: kill -9 of the leader's postmaster", p, s,
			fmt.Sprintf("%s; failover %v; first write on the new leader %s", w, fmtDur(failover), first))
		g := goal(p)
		g.check(t, s.failed <= scLoadWorkers, "%s: %d writes failed, want <= %d (one per worker, in flight at the kill)", p.name, s.failed, scLoadWorkers)
		g.check(t, s.firstOK >= 0 && s.firstOK-up <= time.Second,
			"%s: first write on the new leader %s, want within 1s of the failover (%v)", p.name, first, fmtDur(up))
		g.check(t, w.dups == 0 && w.missing == 0, "%s: %d duplicates, %d acknowledged writes missing; want 0, 0", p.name, w.dups, w.missing)
	}
}

// writableThrough opens a fresh session on dsn and commits a write, as an
// independent measure of when the failover is done: with synchronous_mode
// the new leader completes commits only once Patroni has dropped its lost
// synchronous standby, which can come a loop after the promotion.
func writableThrough(ctx context.Context, dsn string) error {
	conn, err := pgx.Connect(ctx, dsn+"&connect_timeout=1")
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	// Not cancelled by the probe's 1 s bound: a cancelled wait for the
	// synchronous standby returns success (committed locally, with a
	// warning), which would date "up" before writes really commit.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	_, err = conn.Exec(wctx, "INSERT INTO ha_up VALUES (now())")
	return err
}
