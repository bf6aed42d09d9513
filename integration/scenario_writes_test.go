package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// ---- scenarios: restarts and outages under load, reads and writes ----

func scFaultUnderLoad(mode faultlab.StopMode, outage time.Duration) func(env *scEnv) {
	return func(env *scEnv) {
		ps := env.standardPools()
		fs := env.stopStartEach(ps, mode, outage, selectOne)
		for i, p := range ps {
			p.note = faultStats(p, fs[i]).note(fs[i])
		}
		env.checkFault(ps[0], fs[0], outage > 0)
		if outage > 0 {
			env.checkOutageEvents(ps[0], fs[0])
		}
		ps[0].note += "; " + account(env.stats(ps[0]))
	}
}

// stopStartEach runs the same fault under load once per pool, one pool
// after the other on the same server, each warmed just before its turn
// (the previous fault ended the sessions of any pool warmed earlier).
// Run side by side, a bare pool's connect storm (thousands a second) fills
// the server's accept queue as it comes back, and the wrapper's first
// session waits behind it: what recovery measured then was the bare
// driver. It returns the faults in the pools' order.
func (env *scEnv) stopStartEach(ps []*scPool, mode faultlab.StopMode, outage time.Duration, op scOpFunc) []scFault {
	env.t.Helper()
	fs := make([]scFault, len(ps))
	for i, p := range ps {
		env.warm([]*scPool{p}, "SELECT 1")
		fs[i] = env.stopStartUnderLoad([]*scPool{p}, mode, outage, scMaxOps, op)
	}
	return fs
}

// scWrites runs 8 writers per pool inserting client-generated ids into a
// table without a unique constraint through a stop/start: a write the
// wrapper ran twice would show up as a duplicate row, a write it lost as a
// missing acknowledged id.
func scWrites(mode faultlab.StopMode, outage time.Duration) func(env *scEnv) {
	return func(env *scEnv) {
		env.writes(mode, outage, func(ctx context.Context, p *scPool, id int64) error {
			_, err := p.db.ExecContext(ctx, env.e.insertSQL(p.table), id)
			return err
		})
	}
}

// scTxWrites is scWrites with each insert in a transaction run by
// resilientpg.RunTx (on both pools: RunTx works over any *sql.DB). Every
// error the wrapper's caller gets must be ErrCommitUnknown or its own
// deadline; how many of the unknown commits did commit is reported.
func scTxWrites(mode faultlab.StopMode, outage time.Duration) func(env *scEnv) {
	return func(env *scEnv) {
		ps := env.writes(mode, outage, func(ctx context.Context, p *scPool, id int64) error {
			return resilientpg.RunTx(ctx, p.db, nil, func(ctx context.Context, tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, env.e.insertSQL(p.table), id)
				return err
			})
		})
		w := ps[0]
		got := rowIDs(env.ctx, env.t, env.srv.admin, w.table)
		unknown, unknownCommitted := 0, 0
		for _, o := range w.rec.snapshot() {
			switch {
			case o.err == nil:
			case errors.Is(o.err, resilientpg.ErrCommitUnknown):
				unknown++
				if got[o.val] > 0 {
					unknownCommitted++
				}
			case errors.Is(o.err, context.DeadlineExceeded):
			default:
				env.t.Errorf("%s: RunTx returned %v: want success, ErrCommitUnknown or the caller's deadline", w.name, o.err)
			}
		}
		s := env.stats(w)
		w.note += fmt.Sprintf("; RunTx: %d commit-unknown (%d of them committed), %d attempts, retries %v",
			unknown, unknownCommitted, s.TxAttempts, s.TxRetries)
	}
}

// writes runs 8 writers per pool inserting client-generated ids with write
// through a stop/start, and checks the wrapper's: no duplicate, no
// acknowledged write missing. It returns the pools, wrapper first.
func (env *scEnv) writes(mode faultlab.StopMode, outage time.Duration, write func(ctx context.Context, p *scPool, id int64) error) []*scPool {
	ps := env.standardPools()
	for i, p := range ps {
		p.table = fmt.Sprintf("rows_%d", i)
		env.srv.createTable(env.ctx, env.t, p.table)
	}
	insert := func(ctx context.Context, p *scPool) (int64, error) {
		id := p.seq.Add(1)
		return id, write(ctx, p, id)
	}
	fs := env.stopStartEach(ps, mode, outage, insert)
	for i, p := range ps {
		w := env.checkWrites(p)
		p.note = fmt.Sprintf("rows %d, duplicates %d, acked missing %d, failed but present %d/%d; %s",
			w.rows, w.dups, w.missing, w.failedPresent, w.failed, faultStats(p, fs[i]).note(fs[i]))
		if p.wrapper {
			env.checkRecovery(p, fs[i])
			if w.dups != 0 {
				env.t.Errorf("%s: %d duplicate rows: a write ran twice", p.name, w.dups)
			}
			if w.missing != 0 {
				env.t.Errorf("%s: %d acknowledged writes are missing", p.name, w.missing)
			}
			if w.strays != 0 {
				env.t.Errorf("%s: %d rows with ids never written (test bug?)", p.name, w.strays)
			}
		}
		env.t.Logf("%s: %d rows, %d duplicates, %d acknowledged missing, %d of %d failed writes present anyway",
			p.name, w.rows, w.dups, w.missing, w.failedPresent, w.failed)
	}
	return ps
}

type scWriteStats struct {
	rows, dups, missing, failed, failedPresent, strays int
}

func (env *scEnv) checkWrites(p *scPool) scWriteStats {
	env.t.Helper()
	got := rowIDs(env.ctx, env.t, env.srv.admin, p.table)
	var w scWriteStats
	tried := map[int64]bool{} // id -> acknowledged
	for _, o := range p.rec.snapshot() {
		tried[o.val] = o.err == nil
		if o.err != nil {
			w.failed++
			if got[o.val] > 0 {
				w.failedPresent++
			}
		} else if got[o.val] == 0 {
			w.missing++
		}
	}
	for id, n := range got {
		w.rows += n
		w.dups += n - 1
		if _, ok := tried[id]; !ok {
			w.strays++
		}
	}
	return w
}
