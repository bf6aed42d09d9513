package integration

import (
	"database/sql"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// nfReapBound is how soon after the wrapper's recovery the server must be
// back to the pool's own sessions: the reaper ends 10 orphans in about a
// second and a half (5 a second after a burst of 5), and its own
// connection closes a second after the last.
const nfReapBound = 10 * time.Second

// nfReapOrphans drops every pooled flow in the kernel, NAT-style (new
// flows pass), once the pool has idled past the checkout ping's threshold:
// the pings time out, the wrapper replaces its 10 connections, and the
// server would hold 20 sessions of the application, 10 of them for hours.
// The wrapper must bring that back to 10 within nfReapBound of its
// recovery; the bare driver's orphans stay (measured). The pools run one
// after the other, so that the server's count is each one's own.
func nfReapOrphans(env *nfEnv) {
	for _, wrapper := range []bool{true, false} {
		name := env.e.bare
		if wrapper {
			name = env.e.wrapper
		}
		p := env.openPool(name, wrapper, nil, env.srv.dsn(env.srv.addr()))
		env.warm([]*scPool{p}, "SELECT 1")
		if n := env.srv.clientSessions(env.ctx, env.t); n != scPoolSize {
			env.t.Fatalf("precondition: %s: %d sessions on the server after warming, want %d", name, n, scPoolSize)
		}
		time.Sleep(scPingIdle + 100*time.Millisecond) // past the idle ping threshold
		env.cut("DropFlows", env.ns.DropFlows, scPoolSize)
		env.burst([]*scPool{p}, scHalfOpenN, scBurstC, selectOne)
		recovered := env.now()
		peak, back, last := env.srv.clientSessions(env.ctx, env.t), time.Duration(-1), 0
		for i := 0; i < 400 && env.now() < recovered+nfReapBound; i++ {
			last = env.srv.clientSessions(env.ctx, env.t)
			peak = max(peak, last)
			if last == scPoolSize && back < 0 {
				back = env.now() - recovered
				if wrapper {
					break
				}
			}
			time.Sleep(25 * time.Millisecond)
		}
		sum := summarize(p.rec.snapshot())
		if !wrapper {
			p.note = fmt.Sprintf("%d flows dropped after %v idle; burst %dx%d: %d failed; server sessions %d at recovery, %d after %v",
				scPoolSize, scPingIdle, scHalfOpenN, scBurstC, sum.failed, peak, last, nfReapBound)
			if last != 2*scPoolSize {
				env.t.Logf("%s: %d sessions after %v, not twice the pool: the bare driver's orphans are measured, not asserted", name, last, nfReapBound)
			}
			continue
		}
		s := env.stats(p).Reap
		p.note = fmt.Sprintf("%d flows dropped after %v idle; burst %dx%d: %d failed; server sessions %d at peak, back to %d in %v; reap %+v",
			scPoolSize, scPingIdle, scHalfOpenN, scBurstC, sum.failed, peak, scPoolSize, fmtDur(back), s)
		if back < 0 {
			env.t.Errorf("%s: %d sessions on the server %v after recovery, want %d (reap %+v)", name, last, nfReapBound, scPoolSize, s)
		}
		if s.Orphans != scPoolSize || s.Reaped != scPoolSize || s.NotOurs+s.Gone+s.Failed != 0 {
			env.t.Errorf("%s: reap %+v, want %d orphans, all reaped", name, s, scPoolSize)
		}
		// The wrapper's pool closes, so that the bare driver's count is its own.
		p.db.Close()
		for i := 0; i < 200 && env.srv.clientSessions(env.ctx, env.t) != 0; i++ {
			time.Sleep(25 * time.Millisecond)
		}
		if n := env.srv.clientSessions(env.ctx, env.t); n != 0 {
			env.t.Fatalf("precondition: %d sessions left after the wrapper's pool closed", n)
		}
	}
}

// TestReapNeverAnotherSession: where the wrapper cannot prove a session is
// its own, it ends none. Its connections go through a TCP proxy (which the
// faultlab proxy black-holes, NAT-style: new connections pass), either to
// PgBouncer in transaction or session mode (the pids clients see are
// PgBouncer's) or straight to PostgreSQL (the server sees the proxy's
// address). Other clients hold sessions on the server, directly and
// through PgBouncer, each inside a transaction so that it keeps its server
// connection; every one of them must survive, with the same backend, and
// every orphan must be counted as not ours.
func TestReapNeverAnotherSession(t *testing.T) {
	for _, mode := range []string{"transaction", "session", "no pooler"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			env := newHAEnv(t, haPG)
			var srv *scServer
			target, params := "", ""
			if mode == "no pooler" {
				srv = startScServer(t, haPG)
				target = srv.addr()
			} else {
				var b *faultlab.PgBouncer
				srv, b = startBouncer(t, mode, nil)
				target, params = b.Addr(), haTxMode
			}
			others := holdOthers(env, srv, target)
			before := srv.clientSessions(env.ctx, t)

			pr := env.newProxy(target)
			p := env.openPool(env.e.wrapper, true, pr, fmt.Sprintf("postgres://postgres@%s/test?sslmode=disable&%s", pr.Addr(), params))
			env.warm([]*scPool{p}, "SELECT 1")
			time.Sleep(scPingIdle + 100*time.Millisecond)
			if n := pr.BlackholeAll(); n != scPoolSize {
				t.Fatalf("precondition: %d connections black-holed, want %d", n, scPoolSize)
			}
			env.burst([]*scPool{p}, 3*scBurstC, scBurstC, selectOne)
			var s resilientpg.ReapStats
			for i := 0; i < 200; i++ { // until every orphan has an outcome, at most 10 s
				if s = env.stats(p).Reap; s.Orphans >= scPoolSize && s.Reaped+s.NotOurs+s.Gone+s.Failed == s.Orphans {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			t.Logf("%s: reap %+v; server sessions %d before the wrapper's pool", mode, s, before)
			if s.Orphans < scPoolSize || s.NotOurs != s.Orphans || s.Reaped != 0 {
				t.Errorf("reap %+v: want %d or more orphans, every one not ours, none reaped", s, scPoolSize)
				for _, r := range p.log.Events("session.reap_failed") {
					t.Logf("session.reap_failed: %v", r.Attrs)
				}
			}
			others.check(env)
		})
	}
}

// others are sessions of other clients, each pinned to its server backend
// by an open transaction.
type others struct {
	conns []*sql.Conn
	pids  []int64
	srv   *scServer
}

// holdOthers opens 3 sessions straight to the server and, when via is not
// the server, 3 through it, as another application would.
func holdOthers(env *scEnv, srv *scServer, via string) *others {
	env.t.Helper()
	o := &others{srv: srv}
	addrs := []string{srv.addr()}
	if via != srv.addr() {
		addrs = append(addrs, via)
	}
	for _, addr := range addrs {
		db, err := sql.Open(env.e.bare, fmt.Sprintf("postgres://postgres@%s/test?sslmode=disable&application_name=other&%s", addr, haTxMode))
		if err != nil {
			env.t.Fatal(err)
		}
		env.t.Cleanup(func() { db.Close() })
		for range 3 {
			c, err := db.Conn(env.ctx)
			if err != nil {
				env.t.Fatal(err)
			}
			env.t.Cleanup(func() { c.Close() })
			var pid int64
			if _, err := c.ExecContext(env.ctx, "BEGIN"); err != nil {
				env.t.Fatal(err)
			}
			if err := c.QueryRowContext(env.ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				env.t.Fatal(err)
			}
			o.conns, o.pids = append(o.conns, c), append(o.pids, pid)
		}
	}
	return o
}

// check fails the test if any other client lost its session: each still
// answers on the same backend, which the server still lists.
func (o *others) check(env *scEnv) {
	env.t.Helper()
	for i, c := range o.conns {
		var pid int64
		if err := c.QueryRowContext(env.ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			env.t.Errorf("other client %d (backend %d): %v", i, o.pids[i], err)
			continue
		}
		if pid != o.pids[i] {
			env.t.Errorf("other client %d: backend %d, was %d: its session was ended", i, pid, o.pids[i])
		}
	}
	var live []int64
	rows, err := o.srv.admin.QueryContext(env.ctx, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'")
	if err != nil {
		env.t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var pid int64
		if err := rows.Scan(&pid); err != nil {
			env.t.Fatal(err)
		}
		live = append(live, pid)
	}
	for _, pid := range o.pids {
		if !slices.Contains(live, pid) {
			env.t.Errorf("backend %d of another client is gone from pg_stat_activity", pid)
		}
	}
}
