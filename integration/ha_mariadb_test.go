package integration

import (
	"fmt"
	"testing"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// TestHAMariaDBReplicaFailover fails a MariaDB primary over to its GTID
// replica the Aurora way, under write load through one endpoint: the old
// primary turns read_only, the replica catches up and is promoted, the
// endpoint moves to it. Pooled connections still reach the old primary
// and get error 1290; with resilient_reject_read_only=true the wrapper
// must retire them and retry: no write started after the switch may
// fail, and every one must land on the new primary.
func TestHAMariaDBReplicaFailover(t *testing.T) {
	for _, c := range []struct{ name, params string }{
		{"prepared statements", ""}, // the 1290 comes from a prepared statement: stmt.go
		{"interpolateParams=true", "interpolateParams=true"},
	} {
		t.Run(c.name, func(t *testing.T) { mariadbFailover(t, c.params) })
	}
}

func mariadbFailover(t *testing.T, params string) {
	r, err := faultlab.StartMariaDBPair(topoCtx(t), faultlab.MariaDBOptions{
		// Commits crash-safe, as in the scenario table.
		ExtraArgs: []string{"--innodb-flush-log-at-trx-commit=2"},
		Logf:      t.Logf,
	})
	requireTopology(t, "MariaDB primary and replica", err)
	t.Cleanup(func() { r.Close() })
	old, repl := r.Node(0), r.Node(1)
	ep, err := faultlab.NewEndpoint(old.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	haExec(t, haMy, old.DSN("test"), haMy.haCreateSQL())

	env := newHAEnv(t, haMy)
	dsn := fmt.Sprintf("root@tcp(%s)/test?%s", ep.Addr(), params)
	ps := env.haPools(dsn+"&resilient_reject_read_only=true", dsn)
	env.warm(ps, "SELECT 1")
	halt := env.load(ps, scLoadWorkers, scMaxOps, env.haInsert)
	env.sleepUntil(scFaultAt)
	switchBegin := env.now()
	if err := old.SetReadOnly(env.ctx, true); err != nil {
		t.Fatal(err)
	}
	readOnly := env.now()
	if err := r.CatchUp(env.ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Promote(env.ctx); err != nil {
		t.Fatal(err)
	}
	if err := ep.SetTarget(repl.Addr()); err != nil {
		t.Fatal(err)
	}
	switched := env.now()
	env.sleepUntil(switched + scAfterUp)
	halt()
	t.Logf("old primary read-only %v..%v, replica promoted and endpoint moved at %v", fmtDur(switchBegin), fmtDur(readOnly), fmtDur(switched))
	newID := int64(2) // server_id of node 1
	for _, p := range ps {
		s := haStatsOf(p, switchBegin, switched, switched, switched)
		w := env.haCheckRows(p, repl.DSN("test"))
		offNew := 0 // acknowledged, started after the switch, not on the new primary
		for _, o := range p.rec.snapshot() {
			if o.err == nil && o.start >= switched && w.srv[o.val] != newID {
				offNew++
			}
		}
		env.haLog("mariadb: replica promoted, endpoint moved, old primary read_only; "+params, p, s,
			fmt.Sprintf("%s; failed during the switch %d; acked after the switch but not on the new primary %d", w, s.failed-s.failedAfter, offNew))
		goal(p).check(t, s.failedAfter == 0 && offNew == 0,
			"%s: %d writes started after the switch failed, %d acknowledged ones are not on the new primary; want 0, 0",
			p.name, s.failedAfter, offNew)
		goal(p).check(t, w.dups == 0 && w.missing == 0,
			"%s: %d duplicates, %d acknowledged writes missing; want 0, 0", p.name, w.dups, w.missing)
		if p.wrapper {
			t.Logf("%s: %s", p.name, account(env.stats(p)))
		}
	}
}
