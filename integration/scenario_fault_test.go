package integration

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// ---- a stop/start fault under load: how it runs and what it counts ----

// scFault is when a stop/start fault happened, relative to the scenario's
// t0, and each pool's proxy accept count at its edges.
type scFault struct {
	stopBegin, stopEnd, startBegin, startEnd time.Duration
	up                                       time.Duration // a session that got in began (watchUp)
	upConnect                                time.Duration // how long that session took to get in
	in                                       time.Duration // the server accepted again; see settleIn
	accStop, accStart, accStartEnd           map[*scPool]int64
	outage                                   bool
	// buckets[p][i] is how many connections reached p's proxy in the i-th
	// 500 ms after the stop began, while the server was down.
	buckets map[*scPool][]int64
}

const scBucket = 500 * time.Millisecond

// sampleAccepts records each pool's proxy accept count every scBucket
// until done closes (at most 2 minutes).
func sampleAccepts(pools []*scPool, done <-chan struct{}) <-chan map[*scPool][]int64 {
	out := make(chan map[*scPool][]int64, 1)
	go func() {
		prev := accepted(pools)
		b := map[*scPool][]int64{}
		tick := time.NewTicker(scBucket)
		defer tick.Stop()
		defer func() { out <- b }()
		for range int(2 * time.Minute / scBucket) {
			end := false
			select {
			case <-done:
				end = true // the last, partial bucket
			case <-tick.C:
			}
			now := accepted(pools)
			for _, p := range pools {
				b[p] = append(b[p], now[p]-prev[p])
			}
			prev = now
			if end {
				return
			}
		}
	}()
	return out
}

func accepted(pools []*scPool) map[*scPool]int64 {
	m := make(map[*scPool]int64, len(pools))
	for _, p := range pools {
		m[p] = p.proxy.Accepted()
	}
	return m
}

// stopStartUnderLoad runs 8 workers per pool, each pausing recoveryPause
// between operations, stops the server 1 s after the load began with mode,
// starts it again after outage, and lets the load run on until 4 s after
// it began or 2 s after the server is back, whichever is later.
func (env *scEnv) stopStartUnderLoad(pools []*scPool, mode faultlab.StopMode, outage time.Duration, maxOps int, op scOpFunc) scFault {
	env.t.Helper()
	base := env.now()
	stop := env.loadPaced(pools, scLoadWorkers, maxOps, op, recoveryPause)
	env.sleepUntil(base + scUnderLoadLead)
	f := scFault{outage: outage > 0}
	f.accStop = accepted(pools)
	sampling := make(chan struct{})
	samples := sampleAccepts(pools, sampling)
	stopSampling := sync.OnceFunc(func() { close(sampling) })
	defer stopSampling() // if a stop or start fails
	f.stopBegin = env.now()
	if err := env.srv.stop(mode); err != nil {
		stop()
		env.t.Fatalf("stop (%v): %v", mode, err)
	}
	f.stopEnd = env.now()
	upCh := env.srv.watchUp(env.ctx, env.t0)
	time.Sleep(outage)
	f.accStart = accepted(pools)
	f.startBegin = env.now()
	stopSampling()
	f.buckets = <-samples
	if err := env.srv.start(env.ctx); err != nil {
		stop()
		env.t.Fatalf("start: %v", err)
	}
	f.startEnd = env.now()
	f.accStartEnd = accepted(pools)
	f.up, f.upConnect = awaitUp(upCh, f.startEnd)
	env.sleepUntil(max(base+scUnderLoadRun, f.startEnd+scUnderLoadAfter))
	stop()
	f.settleIn(pools, f.startEnd)
	env.t.Logf("fault (%v): stop %v..%v, start %v..%v, accepting again at %v (the first client seen to get in; a direct poller's session began at %v and got in after %v)",
		mode, fmtDur(f.stopBegin), fmtDur(f.stopEnd), fmtDur(f.startBegin), fmtDur(f.startEnd), fmtDur(f.in), fmtDur(f.up), fmtDur(f.upConnect))
	return f
}

// settleIn sets f.in, the moment the server accepted again: when the
// first client was seen to get in after the fault, the direct poller
// (watchUp: its session's start plus the time it took to get in) or any
// pool of the scenario, the bare driver's included, which dials thousands
// of times a second. Its session's set-up is the server's own time: a
// forked process, which right after a restart also rebuilds the catalog
// cache. On this project's 2-CPU VM that took the poller 70-400 ms after
// a restart, more than the recovery bound itself, and no client can have
// its first success before the server has let one in; what the bound
// measures is the wrapper's own delay, which its probe schedule decides.
// gotIn, when positive, is a moment by which a session is known to have
// got in (faultlab's Start returns only then).
func (f *scFault) settleIn(pools []*scPool, gotIn time.Duration) {
	f.in = f.up + f.upConnect
	if gotIn > 0 {
		f.in = min(f.in, gotIn)
	}
	for _, p := range pools {
		if ok := firstOKAfter(p, f.stopEnd); ok >= 0 {
			f.in = min(f.in, ok)
		}
	}
}

// firstOKAfter is when p's first successful operation after t ended, or
// -1.
func firstOKAfter(p *scPool, t time.Duration) time.Duration {
	ok := time.Duration(-1)
	for _, o := range p.rec.snapshot() {
		if o.err == nil && o.end > t && (ok < 0 || o.end < ok) {
			ok = o.end
		}
	}
	return ok
}

// recoveryLag is how long after the server accepted again (f.in) a
// pool's first success came.
func (f *scFault) recoveryLag(firstOK time.Duration) time.Duration { return firstOK - f.in }

// scFaultStats is what one pool saw of a stop/start fault.
type scFaultStats struct {
	failed        int
	inflight      int // in flight at the moment the stop began
	overlapping   int // in flight at some moment of the stop (stopBegin..stopEnd)
	failedOutside int // failed without overlapping the stop: they met the server down or back
	failedAfterUp int // failed although they started after the server accepted again
	firstOK       time.Duration
	attempts      int64   // connections reaching the pool's proxy from stop to start
	rate          float64 // attempts per second of that interval
	buckets       []int64 // attempts per 500 ms of that interval
}

func faultStats(p *scPool, f scFault) scFaultStats {
	var s scFaultStats
	s.firstOK = -1
	for _, o := range p.rec.snapshot() {
		overlaps := o.start < f.stopEnd && o.end > f.stopBegin
		if overlaps {
			s.overlapping++
		}
		if o.start <= f.stopBegin && o.end > f.stopBegin {
			s.inflight++
		}
		if o.err != nil {
			s.failed++
			if !overlaps {
				s.failedOutside++
			}
			if o.start >= f.up {
				s.failedAfterUp++
			}
		} else if o.end > f.stopEnd && (s.firstOK < 0 || o.end < s.firstOK) {
			s.firstOK = o.end
		}
	}
	s.attempts = f.accStart[p] - f.accStop[p]
	s.buckets = f.buckets[p]
	s.rate = float64(s.attempts) / (f.startBegin - f.stopBegin).Seconds()
	return s
}

func (s scFaultStats) note(f scFault) string {
	first := "none"
	if s.firstOK >= 0 {
		first = fmt.Sprintf("in%s (a direct poller's session took %v to get in: first ok %s from its start)",
			signedMs(f.recoveryLag(s.firstOK)), fmtDur(f.upConnect), signedMs(s.firstOK-f.up))
	}
	n := fmt.Sprintf("in flight as the stop began %d, during the stop %d; failed outside the stop %d, after up %d; first ok %s",
		s.inflight, s.overlapping, s.failedOutside, s.failedAfterUp, first)
	if !f.outage {
		return n + fmt.Sprintf("; connects during the restart %d", s.attempts)
	}
	return n + fmt.Sprintf("; connects while down %d in %v (%.1f/s; per 500ms: %s)",
		s.attempts, (f.startBegin-f.stopBegin).Round(10*time.Millisecond), s.rate, s.bucketList())
}

// signedMs renders d rounded to the millisecond with its sign: "+72ms".
func signedMs(d time.Duration) string {
	d = d.Round(time.Millisecond)
	if d < 0 {
		return d.String()
	}
	return "+" + d.String()
}

func (s scFaultStats) bucketList() string {
	parts := make([]string, len(s.buckets))
	for i, n := range s.buckets {
		parts[i] = strconv.FormatInt(n, 10)
	}
	return strings.Join(parts, ",")
}

// checkFault asserts the wrapper's goals for a stop/start under load: only
// operations caught by the stop itself may fail (at most one per worker),
// and none that started once the server accepted again; the first success
// within scRecoverBound of the server accepting again (checkRecovery); and
// after an outage the pool's connect attempts while the server is down
// stay at scRefusalRate a second plus one per connection busy when it
// went.
func (env *scEnv) checkFault(p *scPool, f scFault, outage bool) {
	env.t.Helper()
	s := faultStats(p, f)
	if s.failed > scLoadWorkers {
		env.t.Errorf("%s: %d operations failed, want <= %d (one in flight per worker)", p.name, s.failed, scLoadWorkers)
	}
	if s.failedOutside > 0 {
		env.t.Errorf("%s: %d failed operations did not overlap the stop (%v..%v): they should have waited for the server and succeeded",
			p.name, s.failedOutside, fmtDur(f.stopBegin), fmtDur(f.stopEnd))
	}
	if s.failedAfterUp > 0 {
		env.t.Errorf("%s: %d operations failed that started after the server accepted again (%v)", p.name, s.failedAfterUp, fmtDur(f.up))
	}
	env.checkRecovery(p, f)
	if !outage {
		return
	}
	// Probes, not one attempt per request: the proxy refuses while the
	// server is down, which is probed at the refusal rate.
	window := f.startBegin - f.stopBegin
	if allowed := scAllowedConnects(window); s.attempts > allowed {
		env.t.Errorf("%s: %d connection attempts reached the proxy in the %v between stop and start (%.1f/s; per 500ms: %s), want <= %d (%d/s plus one per busy connection)",
			p.name, s.attempts, window.Round(time.Millisecond), s.rate, s.bucketList(), allowed, scRefusalRate)
	}
}

// scAllowedConnects is the most connects a pool may make in window while
// the server refuses: scRefusalRate a second, plus one per connection that
// was busy when the server died, because pgx sends a cancel request for
// each query its server dropped (bare pgx does the same; while the server
// is known down the wrapper skips the rest).
func scAllowedConnects(window time.Duration) int64 {
	return int64(scLoadWorkers) + int64(scRefusalRate*window.Seconds()+0.5)
}
