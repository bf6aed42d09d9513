package integration

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// The high-availability scenarios (ha_*_test.go) start topologies of their
// own (a streaming pair, PgBouncer, Patroni with etcd and HAProxy, a
// MariaDB pair) and reuse the scenario table's machinery: scEnv without a
// server of its own, scPool, load, burst and the fault statistics. Every
// goal is asserted for the wrapper and logged for the bare driver; the
// measured numbers are logged either way ("HA row:" lines).

// haInstallHint is what to install for the HA topologies.
const haInstallHint = "apt-get install pgbouncer patroni etcd-server haproxy (bash .ci/setup)"

// newHAEnv is a scenario environment for engine e without a server: the
// test starts its topology itself.
func newHAEnv(t *testing.T, e scEngine) *scEnv {
	t.Helper()
	env := &scEnv{t: t, e: e}
	env.ctx = ctxT(t, 3*time.Minute)
	env.t0 = time.Now()
	return env
}

var (
	haPG = scEngines[0]
	haMy = scEngines[1]
)

// requireTopology applies the package's CI policy to a topology that did
// not start: with CI set it fails; elsewhere a missing program skips, with
// what to install; any other failure fails.
func requireTopology(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	switch {
	case os.Getenv("CI") != "":
		t.Fatalf("%s did not start (CI is set, so this is a failure): %v", what, err)
	case errors.Is(err, faultlab.ErrNotInstalled):
		t.Skipf("%s: %v; %s, or set CI=1 to make this a failure", what, err, haInstallHint)
	default:
		t.Fatalf("%s did not start: %v", what, err)
	}
}

// topoCtx bounds a topology start.
func topoCtx(t testing.TB) context.Context { return ctxT(t, 2*time.Minute) }

// haPools opens the wrapper's pool on wrapperDSN and the bare driver's on
// bareDSN, without proxies, wrapper first.
func (env *scEnv) haPools(wrapperDSN, bareDSN string) []*scPool {
	env.t.Helper()
	return []*scPool{
		env.openPool(env.e.wrapper, true, nil, wrapperDSN),
		env.openPool(env.e.bare, false, nil, bareDSN),
	}
}

// haTable is the write scenarios' table: a client-generated id without a
// unique constraint (a write run twice shows as a duplicate), the pool
// that wrote it, and the server that executed it (PostgreSQL's port,
// MariaDB's server_id).
const haTable = "ha_rows"

func (e scEngine) haCreateSQL() string {
	if e.pg {
		return "CREATE TABLE " + haTable + " (id bigint NOT NULL, pool text NOT NULL, srv int NOT NULL)"
	}
	return "CREATE TABLE " + haTable + " (id bigint NOT NULL, pool varchar(32) NOT NULL, srv int NOT NULL) ENGINE=InnoDB"
}

// haInsert writes one row with a new id; the id is the op's value.
func (env *scEnv) haInsert(ctx context.Context, p *scPool) (int64, error) {
	q := "INSERT INTO " + haTable + " (id, pool, srv) VALUES ($1, $2, current_setting('port')::int)"
	if !env.e.pg {
		q = "INSERT INTO " + haTable + " (id, pool, srv) VALUES (?, ?, @@server_id)"
	}
	id := p.seq.Add(1)
	_, err := p.db.ExecContext(ctx, q, id, p.name)
	return id, err
}

// haExec runs q on a fresh bare connection to dsn.
func haExec(t testing.TB, e scEngine, dsn, q string) {
	t.Helper()
	db := openDB(t, e.bare, dsn)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := db.ExecContext(ctx, q); err != nil {
		t.Fatalf("%q: %v", q, err)
	}
}

// haWrites is what the final primary holds of one pool's writes.
type haWrites struct {
	rows, dups, missing, failed, failedPresent int
	srv                                        map[int64]int64 // id -> server that wrote it
}

// haCheckRows reads pool p's rows through query (a bare DSN to the final
// primary) and compares them with what p's callers were told.
func (env *scEnv) haCheckRows(p *scPool, dsn string) haWrites {
	env.t.Helper()
	db := openDB(env.t, env.e.bare, dsn)
	q := "SELECT id, srv FROM " + haTable + " WHERE pool = $1"
	if !env.e.pg {
		q = strings.Replace(q, "$1", "?", 1)
	}
	rows, err := db.QueryContext(env.ctx, q, p.name)
	if err != nil {
		env.t.Fatalf("read %s: %v", haTable, err)
	}
	defer rows.Close()
	w := haWrites{srv: map[int64]int64{}}
	count := map[int64]int{}
	for rows.Next() {
		var id, srv int64
		if err := rows.Scan(&id, &srv); err != nil {
			env.t.Fatal(err)
		}
		count[id]++
		w.srv[id] = srv
		w.rows++
	}
	if err := rows.Err(); err != nil {
		env.t.Fatal(err)
	}
	for _, n := range count {
		w.dups += n - 1
	}
	for _, o := range p.rec.snapshot() {
		switch {
		case o.err != nil:
			w.failed++
			if count[o.val] > 0 {
				w.failedPresent++
			}
		case count[o.val] == 0:
			w.missing++
		}
	}
	return w
}

// firstOn returns the end of p's first acknowledged write that server srv
// executed, -1 if there is none.
func firstOn(p *scPool, w haWrites, srv int64) time.Duration {
	first := time.Duration(-1)
	for _, o := range p.rec.snapshot() {
		if o.err == nil && w.srv[o.val] == srv && (first < 0 || o.end < first) {
			first = o.end
		}
	}
	return first
}

func (w haWrites) String() string {
	return fmt.Sprintf("rows %d, duplicates %d, acked missing %d, failed but present %d/%d", w.rows, w.dups, w.missing, w.failedPresent, w.failed)
}

// logFailed logs p's first 20 failed operations, times relative to at.
func (env *scEnv) logFailed(p *scPool, at time.Duration) {
	env.t.Helper()
	n := 0
	for _, o := range p.rec.snapshot() {
		if o.err == nil {
			continue
		}
		if n++; n > 20 {
			env.t.Logf("%s: ... more failed operations", p.name)
			return
		}
		env.t.Logf("%s: failed op %+v..%+v after the fault: %s", p.name, o.start-at, o.end-at, errKind(o.err))
	}
}

// haStats is what one pool saw of a fault from begin to end.
type haStats struct {
	ops, failed   int
	inflight      int           // in flight at begin
	failedOutside int           // failed without overlapping begin..end: they met the fault's aftermath
	failedAfter   int           // failed although they started at or after the given moment
	firstOK       time.Duration // end of the first success that ended after okAfter; -1 if none
	maxLat, p99   time.Duration
	firstErr      string
}

func haStatsOf(p *scPool, begin, end, after, okAfter time.Duration) haStats {
	s := haStats{firstOK: -1}
	ops := p.rec.snapshot()
	sum := summarize(ops)
	s.ops, s.failed, s.p99, s.firstErr = sum.ops, sum.failed, sum.p99, sum.firstErr
	for _, o := range ops {
		s.maxLat = max(s.maxLat, o.latency())
		if o.start <= begin && o.end > begin {
			s.inflight++
		}
		if o.err != nil {
			if o.end <= begin || o.start >= end {
				s.failedOutside++
			}
			if o.start >= after {
				s.failedAfter++
			}
		} else if o.end > okAfter && (s.firstOK < 0 || o.end < s.firstOK) {
			s.firstOK = o.end
		}
	}
	return s
}

// haLog logs one pool's numbers as an "HA row" line, for the README.
func (env *scEnv) haLog(scenario string, p *scPool, s haStats, note string) {
	env.t.Helper()
	role := "asserted"
	if !p.wrapper {
		role = "measured"
	}
	env.t.Logf("HA row: %s | %s (%s) | %d ops | %d failed | in flight %d, failed outside the fault %d, after %d | p99 %v, max %v | %s | errors: %s",
		scenario, p.name, role, s.ops, s.failed, s.inflight, s.failedOutside, s.failedAfter, fmtDur(s.p99), fmtDur(s.maxLat),
		note, errKinds(p))
}

// errKind is an error's innermost message (the server's or the network's
// words), with the start of the outer one when a wrapper added its own.
func errKind(err error) string {
	inner := err
	for range 20 {
		var next error
		switch u := inner.(type) {
		case interface{ Unwrap() error }:
			next = u.Unwrap()
		case interface{ Unwrap() []error }:
			if errs := u.Unwrap(); len(errs) > 0 {
				next = errs[len(errs)-1] // the wrapper's cause comes last
			}
		}
		if next == nil {
			break
		}
		inner = next
	}
	k := truncate(oneLine(inner.Error()), 100)
	if inner != err && !strings.HasPrefix(err.Error(), inner.Error()) {
		k = truncate(oneLine(err.Error()), 60) + " <- " + k
	}
	return k
}

// errKinds summarises p's errors: the three most frequent messages, with
// counts, so that a row says what failed, not only how often.
func errKinds(p *scPool) string {
	count := map[string]int{}
	for _, o := range p.rec.snapshot() {
		if o.err != nil {
			count[errKind(o.err)]++
		}
	}
	kinds := slices.SortedFunc(maps.Keys(count), func(a, b string) int { return count[b] - count[a] })
	var parts []string
	for i, k := range kinds {
		if i == 3 {
			parts = append(parts, fmt.Sprintf("(%d more kinds)", len(kinds)-3))
			break
		}
		parts = append(parts, fmt.Sprintf("%dx %q", count[k], k))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "; ")
}

// gate says how a goal is checked: asserted for the wrapper's pool, only
// logged for the bare driver's (the control), to show that each goal can
// fail.
type gate struct {
	control bool
}

// goal is how p's goals are checked: asserted for the wrapper's pool,
// logged for the bare driver's.
func goal(p *scPool) gate {
	return gate{control: !p.wrapper}
}

// check asserts ok, or for the control logs whether it was met.
func (g gate) check(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	switch {
	case g.control && ok:
		t.Logf("CONTROL (bare driver, not asserted): goal met too: %s", msg)
	case g.control:
		t.Logf("CONTROL (bare driver, not asserted): goal missed: %s", msg)
	case !ok:
		t.Error(msg)
	}
}

// haStopStart runs writers (8 per pool) on pools that each sit behind a
// faultlab proxy, runs stop at 2 s, start after outage, and keeps the load
// going until 6 s or 3 s after up, whichever is later. probe, called every
// 10 ms from the stop on, says when the service accepts again. The result
// feeds faultStats and checkFault, the scenario table's goals.
func (env *scEnv) haStopStart(pools []*scPool, stop func() error, outage time.Duration,
	start, probe func(context.Context) error, op scOpFunc) scFault {
	env.t.Helper()
	halt := env.load(pools, scLoadWorkers, scMaxOps, op)
	env.sleepUntil(scFaultAt)
	f := scFault{outage: outage > 0, accStop: accepted(pools)}
	sampling := make(chan struct{})
	samples := sampleAccepts(pools, sampling)
	stopSampling := sync.OnceFunc(func() { close(sampling) })
	defer stopSampling()
	f.stopBegin = env.now()
	if err := stop(); err != nil {
		halt()
		env.t.Fatalf("stop: %v", err)
	}
	f.stopEnd = env.now()
	upCh := watchProbe(env.ctx, env.t0, probe)
	time.Sleep(outage)
	f.accStart, f.startBegin = accepted(pools), env.now()
	stopSampling()
	f.buckets = <-samples
	if err := start(env.ctx); err != nil {
		halt()
		env.t.Fatalf("start: %v", err)
	}
	f.startEnd, f.accStartEnd = env.now(), accepted(pools)
	select {
	case f.up = <-upCh:
	case <-time.After(30 * time.Second):
		f.up = -1
	}
	if f.up < 0 {
		f.up = f.startEnd // the probe never got through: start's return is the best guess
	}
	// Unlike the scenario table's, f.up may come after start returned: the
	// service behind the pools (PgBouncer) can serve later than the server
	// it fronts accepts.
	env.sleepUntil(max(scLoadRun, f.up+scAfterUp))
	halt()
	f.settleIn(pools, 0)
	env.t.Logf("fault: stop %v..%v, start %v..%v, accepting again at %v (the first client seen to get in; the probe got through at %v)",
		fmtDur(f.stopBegin), fmtDur(f.stopEnd), fmtDur(f.startBegin), fmtDur(f.startEnd), fmtDur(f.in), fmtDur(f.up))
	return f
}

// watchProbe calls probe every 10 ms (each bounded to 1 s) until it
// succeeds and delivers when that probe ended, relative to t0: a probe
// that commits a write can wait inside the server (a synchronous standby
// being dropped), and the service is up when it returns. -1 after 30 s or
// when ctx ends.
func watchProbe(ctx context.Context, t0 time.Time, probe func(context.Context) error) <-chan time.Duration {
	ch := make(chan time.Duration, 1)
	go func() {
		deadline := time.Now().Add(30 * time.Second)
		for i := 0; i < 3000 && time.Now().Before(deadline) && ctx.Err() == nil; i++ {
			pctx, cancel := context.WithTimeout(ctx, time.Second)
			err := probe(pctx)
			cancel()
			if err == nil {
				ch <- time.Since(t0)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		ch <- -1
	}()
	return ch
}
