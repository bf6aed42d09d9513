package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// The fleet test's measurements: the proxy's accept count over time, and
// what each fleet saw of the restart.

// acceptSample is the proxy's accept count at a moment of the run.
type acceptSample struct {
	at time.Duration
	n  int64
}

// acceptSampler records the proxy's accept count every fleetSample until
// stopped (at most 2 minutes' worth).
type acceptSampler struct {
	mu      sync.Mutex
	samples []acceptSample
	done    chan struct{}
	stop    func()
	wg      sync.WaitGroup
}

func startAcceptSampler(env *scEnv, p *faultlab.Proxy) *acceptSampler {
	s := &acceptSampler{done: make(chan struct{})}
	s.stop = sync.OnceFunc(func() { close(s.done); s.wg.Wait() })
	s.wg.Go(func() {
		tick := time.NewTicker(fleetSample)
		defer tick.Stop()
		for range int(2 * time.Minute / fleetSample) {
			at, n := env.now(), p.Accepted()
			s.mu.Lock()
			s.samples = append(s.samples, acceptSample{at, n})
			s.mu.Unlock()
			select {
			case <-s.done:
				return
			case <-tick.C:
			}
		}
	})
	env.t.Cleanup(s.stop)
	return s
}

// at returns the last sample taken at or before d (the first one if none).
func (s *acceptSampler) at(d time.Duration) acceptSample {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, _ := slices.BinarySearchFunc(s.samples, d, func(a acceptSample, d time.Duration) int {
		if a.at <= d {
			return -1
		}
		return 1
	})
	if i == 0 {
		return s.samples[0]
	}
	return s.samples[i-1]
}

// measure fills r from the pools' operations and the accept samples.
func (r *fleetResult) measure(pools []*scPool, sampler *acceptSampler) {
	kinds := map[string]int{}
	type first struct {
		pool string
		d    time.Duration
	}
	var firsts []first
	oks := make(map[string]time.Duration, len(pools)) // each pool's first success after the stop
	for _, p := range pools {
		ok := time.Duration(-1)
		for _, o := range p.rec.snapshot() {
			r.ops++
			if o.err == nil {
				if o.end > r.stopEnd && (ok < 0 || o.end < ok) {
					ok = o.end
				}
				continue
			}
			r.failed++
			kinds[errKind(o.err)]++
			if isTooMany(o.err) {
				r.tooMany++
				// The error reached the caller outside the window: before the
				// stop began or once the server accepted sessions again.
				if o.end < r.stopBegin || o.end > r.up {
					r.tooManyOutside = append(r.tooManyOutside, o)
				}
			}
		}
		if ok < 0 {
			r.noOK++
			continue
		}
		oks[p.name] = ok
	}
	// The server accepted again when the first client was seen to get in:
	// the direct poller, or a pool of the fleet before it.
	r.in = r.upIn()
	for _, ok := range oks {
		r.in = min(r.in, ok)
	}
	for name, ok := range oks {
		firsts = append(firsts, first{name, ok - r.in})
		r.firstOK = append(r.firstOK, ok-r.in)
	}
	slices.SortFunc(firsts, func(a, b first) int { return int(b.d - a.d) })
	for _, f := range firsts[:min(3, len(firsts))] {
		r.slowest = append(r.slowest, f.pool+" "+upRel(f.d))
	}
	if len(r.firstOK) > 0 {
		r.maxFirst = slices.Max(r.firstOK)
		r.p50 = percentile(r.firstOK, 50)
	}
	var ks []string
	for k := range kinds {
		ks = append(ks, k)
	}
	slices.SortFunc(ks, func(a, b string) int { return kinds[b] - kinds[a] })
	for i, k := range ks {
		if i == 4 {
			r.errKinds += fmt.Sprintf("; %d other kinds", len(ks)-i)
			break
		}
		if i > 0 {
			r.errKinds += "; "
		}
		r.errKinds += fmt.Sprintf("%d x %s", kinds[k], k)
	}

	// Connects while down: from the stop's beginning to the last sample at
	// or before up, so that the recovery's connects are not counted.
	atUp := sampler.at(r.up)
	r.downAttempts = atUp.n - r.accStop
	r.downWindow = max(atUp.at-r.stopBegin, time.Millisecond)
	for b := r.stopBegin; b < atUp.at; b += fleetBucket {
		from := r.accStop
		if b > r.stopBegin {
			from = sampler.at(b).n
		}
		r.downBuckets = append(r.downBuckets, sampler.at(min(b+fleetBucket, atUp.at)).n-from)
	}
	r.afterUp1s = sampler.at(r.up+time.Second).n - atUp.n
	// One probe schedule for the fleet (its pools share it), one probe per
	// pool as each loses its connections, before any knows the server is
	// away, and one per busy connection (pgx's cancel requests).
	r.connectsAllowed = int64(scRefusalRate*r.downWindow.Seconds()+0.5) + fleetPools + fleetPools*fleetWorkers
}

func (r *fleetResult) downRate() float64 { return float64(r.downAttempts) / r.downWindow.Seconds() }

// goalsMissed lists the goals (asserted for the wrapper) the fleet missed.
func (r *fleetResult) goalsMissed() []string {
	var out []string
	if n := len(r.tooManyOutside); n > 0 {
		o := r.tooManyOutside[0]
		out = append(out, fmt.Sprintf("%s: %d operations failed with too many connections outside the restart window %v..%v, the first %v..%v: %s",
			r.name, n, fmtDur(r.stopBegin), fmtDur(r.up), fmtDur(o.start), fmtDur(o.end), errKind(o.err)))
	}
	if r.noOK > 0 {
		out = append(out, fmt.Sprintf("%s: %d of %d pools had no successful operation after the restart", r.name, r.noOK, fleetPools))
	}
	if len(r.firstOK) > 0 && r.maxFirst > r.recoverBound {
		late := 0
		for _, d := range r.firstOK {
			if d > r.recoverBound {
				late++
			}
		}
		out = append(out, fmt.Sprintf("%s: %d pools' first success came later than %v after the server accepted again (max %s, p50 %s; slowest %s; the server let in %d direct sessions at once in %v)",
			r.name, late, r.recoverBound, upRel(r.maxFirst), upRel(r.p50), strings.Join(r.slowest, ", "), fleetPools*fleetWorkers, fmtDur(r.atOnce)))
	}
	if r.downAttempts > r.connectsAllowed {
		out = append(out, fmt.Sprintf("%s: %d connection attempts reached the proxy in the %v the server was down (%.0f/s; per %v: %s), want <= %d (%d/s for the fleet, plus one per pool as it lost its connections, %d, and one per busy connection, %d)",
			r.name, r.downAttempts, fmtDur(r.downWindow), r.downRate(), fleetBucket, joinInts(r.downBuckets), r.connectsAllowed,
			scRefusalRate, fleetPools, fleetPools*fleetWorkers))
	}
	return out
}

func (r *fleetResult) log(t *testing.T) {
	t.Helper()
	t.Logf("%s fleet: fast restart: stop %v..%v, start %v..%v, accepting again at %v (the first client seen to get in; a direct poller's session began at %v and got in at %v); %d client sessions before the stop",
		r.name, fmtDur(r.stopBegin), fmtDur(r.stopEnd), fmtDur(r.startBegin), fmtDur(r.startEnd), fmtDur(r.in), fmtDur(r.up), fmtDur(r.upIn()), r.sessionsBefore)
	t.Logf("%s fleet: %d ops, %d failed, %d with too many connections (%d outside the window); errors: %s",
		r.name, r.ops, r.failed, r.tooMany, len(r.tooManyOutside), r.errKinds)
	t.Logf("%s fleet: first success after the stop, per pool: max %s, p50 %s, %d pools without; slowest %s; bound %v (the server let in %d direct sessions at once in %v)",
		r.name, upRel(r.maxFirst), upRel(r.p50), r.noOK, strings.Join(r.slowest, ", "), fmtDur(r.recoverBound), fleetPools*fleetWorkers, fmtDur(r.atOnce))
	t.Logf("%s fleet: connects while down %d in %v (%.0f/s, bound %d; per %v: %s); in the first second after up %d; %d accepted in all",
		r.name, r.downAttempts, fmtDur(r.downWindow), r.downRate(), r.connectsAllowed, fleetBucket, joinInts(r.downBuckets), r.afterUp1s, r.acceptsTotal)
	if r.wrapperAccount != "" {
		t.Logf("%s fleet: %s", r.name, r.wrapperAccount)
	}
}

// row is the fleet's one-line summary for the engine's comparison.
func (r *fleetResult) row() string {
	role := "asserted"
	if !r.wrapper {
		role = "measured"
	}
	return fmt.Sprintf("%-14s (%s): down %v; ops %d, failed %d, too-many %d (outside the window %d); first success max %s p50 %s (%d pools none; bound %v, %d direct sessions at once took %v); connects while down %.0f/s (%d in %v, bound %d), first second after up %d",
		r.name, role, fmtDur(r.up-r.stopBegin), r.ops, r.failed, r.tooMany, len(r.tooManyOutside), upRel(r.maxFirst), upRel(r.p50), r.noOK,
		fmtDur(r.recoverBound), fleetPools*fleetWorkers, fmtDur(r.atOnce), r.downRate(), r.downAttempts, fmtDur(r.downWindow), r.connectsAllowed, r.afterUp1s)
}

func joinInts(ns []int64) string {
	parts := make([]string, len(ns))
	for i, n := range ns {
		parts[i] = strconv.FormatInt(n, 10)
	}
	return strings.Join(parts, ",")
}

// upRel renders a moment relative to the server's accepting again (in):
// "in+120ms".
func upRel(d time.Duration) string {
	if d < 0 {
		return "in-" + fmtDur(-d)
	}
	return "in+" + fmtDur(d)
}

// openAtOnce opens n sessions at once through dsn with the bare driver,
// each with a round trip, and returns how long the last took to get in:
// the least time in which the server can serve a fleet whose workers all
// ask for a session together, as they do when it comes back. The sessions
// are closed, and gone from the server, before it returns.
func openAtOnce(t *testing.T, ctx context.Context, e scEngine, dsn string, n int) time.Duration {
	t.Helper()
	db, err := sql.Open(e.bare, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(n)
	octx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conns := make([]*sql.Conn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			conns[i], errs[i] = db.Conn(octx)
			if errs[i] == nil {
				errs[i] = conns[i].PingContext(octx)
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("precondition: %d direct sessions at once: %v", n, err)
	}
	return took
}
