package integration

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/resilientpg/resilientpg"
)

// ---- scenarios: failover and rotation ----

// scReadOnlyFailover warms a pool on server A of a two-host DSN with
// target_session_attrs=read-write, then demotes A and promotes B: every
// write must land on B, none fail.
func scReadOnlyFailover(env *scEnv) {
	t, ctx := env.t, env.ctx
	a := env.srv
	b := startScServer(t, env.e)
	const table = "ro_rows"
	for _, s := range []*scServer{a, b} {
		s.exec(ctx, t, "CREATE TABLE "+table+" (id bigint NOT NULL, pool text NOT NULL)")
	}
	if err := b.pg.SetReadOnly(ctx, true); err != nil { // B starts as the standby
		t.Fatal(err)
	}
	var ps []*scPool
	for _, d := range []struct {
		name    string
		wrapper bool
	}{{env.e.wrapper, true}, {env.e.bare, false}} {
		pa, pb := env.newProxy(a.addr()), env.newProxy(b.addr())
		dsn := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=test sslmode=disable target_session_attrs=read-write",
			pa.Port(), pb.Port())
		ps = append(ps, env.openPool(d.name, d.wrapper, pa, dsn))
	}
	for i, ports := range env.warm(ps, "SELECT current_setting('port')::bigint") {
		for _, port := range ports {
			if port != int64(a.pg.Port) {
				t.Fatalf("precondition: %s warmed a session on port %d, want all on A (%d)", ps[i].name, port, a.pg.Port)
			}
		}
	}
	if err := a.pg.SetReadOnly(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := b.pg.SetReadOnly(ctx, false); err != nil {
		t.Fatal(err)
	}
	insert := func(ctx context.Context, p *scPool) (int64, error) {
		id := p.seq.Add(1)
		_, err := p.db.ExecContext(ctx, "INSERT INTO "+table+" (id, pool) VALUES ($1, $2)", id, p.name)
		return id, err
	}
	env.burst(ps, scBurstN, scBurstC, insert)
	for _, p := range ps {
		var onA, onB, distinctB int
		if err := a.admin.QueryRowContext(ctx, "SELECT count(*) FROM "+table+" WHERE pool = $1", p.name).Scan(&onA); err != nil {
			t.Fatal(err)
		}
		if err := b.admin.QueryRowContext(ctx, "SELECT count(*), count(DISTINCT id) FROM "+table+" WHERE pool = $1", p.name).Scan(&onB, &distinctB); err != nil {
			t.Fatal(err)
		}
		p.note = fmt.Sprintf("rows on A %d, on B %d (%d distinct)", onA, onB, distinctB)
		if p.wrapper {
			env.requireNoFailures(p)
			if onA != 0 || onB != scBurstN || distinctB != scBurstN {
				t.Errorf("%s: %d rows on A, %d on B (%d distinct), want 0 and %d", p.name, onA, onB, distinctB, scBurstN)
			}
		}
	}
}

// scMaxAge runs 10 workers for 6 s on pools whose connections live 2 s
// (the wrapper: resilient_max_age=2s with its 10% jitter; the bare driver:
// SetConnMaxLifetime(2s)): every warmed connection must be replaced, the
// replacements spread out, and no query fail.
func scMaxAge(env *scEnv) {
	const maxAge = 2 * time.Second
	ps := env.standardPools("resilient_max_age=" + maxAge.String())
	ps[1].db.SetConnMaxLifetime(maxAge)
	ps[1].note = "SetConnMaxLifetime(2s); "
	warmAt := env.now()
	gens := env.warm(ps, env.e.idQuery())
	stop := env.load(ps, scPoolSize, scMaxOps, env.queryInt(env.e.idQuery()))
	env.sleepUntil(warmAt + scLoadRun)
	stop()
	for i, p := range ps {
		first := map[int64]time.Duration{}
		for _, id := range gens[i] {
			first[id] = warmAt
		}
		later := map[int64]bool{}
		for _, o := range p.rec.snapshot() {
			if o.err != nil {
				continue
			}
			if last, ok := first[o.val]; ok {
				first[o.val] = max(last, o.end)
			} else {
				later[o.val] = true
			}
		}
		var lasts []time.Duration
		stale := 0
		limit := warmAt + maxAge + time.Second // max age, plus a query's time and scheduling slack
		for _, last := range first {
			lasts = append(lasts, last-warmAt)
			if last > limit {
				stale++
			}
		}
		slices.Sort(lasts)
		spread := lasts[len(lasts)-1] - lasts[0]
		p.note += fmt.Sprintf("first generation %d conns, last used %v..%v after warm-up (spread %v), %d still used after %v; %d later sessions",
			len(first), fmtDur(lasts[0]), fmtDur(lasts[len(lasts)-1]), fmtDur(spread), stale, maxAge+time.Second, len(later))
		if !p.wrapper {
			continue
		}
		env.requireNoFailures(p)
		if len(first) != scPoolSize {
			env.t.Errorf("%s: warm-up saw %d sessions, want %d", p.name, len(first), scPoolSize)
		}
		if stale > 0 {
			env.t.Errorf("%s: %d first-generation sessions were still used more than %v after warm-up", p.name, stale, maxAge+time.Second)
		}
		if len(later) < scPoolSize {
			env.t.Errorf("%s: %d new sessions replaced the first generation, want >= %d", p.name, len(later), scPoolSize)
		}
		if spread < 50*time.Millisecond {
			env.t.Errorf("%s: the first generation was last used within %v, want replacements spread over >= 50ms", p.name, spread)
		}
		s := env.stats(p)
		p.note += "; " + account(s)
		if n := s.Discards[resilientpg.DiscardMaxAge] + s.ReturnsRejected[resilientpg.DiscardMaxAge]; n < scPoolSize {
			env.t.Errorf("%s: %d connections retired for max age (%s), want >= %d", p.name, n, account(s), scPoolSize)
		}
	}
}
