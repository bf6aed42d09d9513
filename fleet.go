package resilientpg

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// serverFleet is what the connectors of one process share about one
// server while it is away and as it comes back: one schedule of probes,
// how many of them still wait for their first connection, and how many
// extra probes of a starting server they run together.
//
// Many pools in one process against one server (a pool per tenant, per
// schema, per library) all reconnect when it comes back, and a server
// lets sessions in at a bounded rate: each is a forked process, and right
// after a restart each rebuilds the catalog cache. Left alone, the pools
// that got back first open the rest of their connections while others
// still wait for their first, and the last pool serves again only when
// the whole storm has been let in; with the first connection of every
// pool put ahead of the second of any, it serves after about one session
// per pool. While the server is away the pools probe it in turn, as one
// client would: 50 pools probing on their own would cost a starting
// server 50 forked processes per probe interval.
type serverFleet struct {
	mu      sync.Mutex
	wanting int           // connectors down with a caller waiting for a connection
	changed chan struct{} // closed, and replaced, when wanting reaches 0
	extra   int           // overlapping probes of a starting server running, over all connectors

	probing int           // turns taken: probes of down connectors running
	newest  time.Time     // when the newest turn was taken
	next    time.Time     // no turn before then: the fleet's own probe interval
	upAt    time.Time     // a probe of some connector last got in
	downAt  time.Time     // a probe of some connector last failed retryably
	ended   chan struct{} // closed, and replaced, when a turn ends
	up      chan struct{} // closed, and replaced, when a probe got in
}

// fleetWindow bounds how long after its own recovery a connector holds
// back further connects for the others of its server: the others may
// have callers that stopped waiting, or a reason of their own to be down
// (a role over its connection limit), and the connector's own callers
// must not wait on them for long.
const fleetWindow = time.Second

// fleets maps a server's key to its serverFleet. Entries are never
// removed: there is one per server address a process has opened a pool
// for.
var fleets sync.Map

// fleetFor returns the shared state for key, or nil, which shares with
// none, when key is empty (a wrapped driver whose server is unknown).
func fleetFor(key string) *serverFleet {
	if key == "" {
		return nil
	}
	f, _ := fleets.LoadOrStore(key, &serverFleet{})
	return f.(*serverFleet)
}

// pgFleetKey names the server of a pgx configuration: its system and every
// host it may connect to, in order.
func pgFleetKey(cfg *pgconn.Config) string {
	var b strings.Builder
	b.WriteString("postgresql")
	b.WriteString(" " + cfg.Host + ":" + strconv.Itoa(int(cfg.Port)))
	for _, fb := range cfg.Fallbacks {
		b.WriteString(" " + fb.Host + ":" + strconv.Itoa(int(fb.Port)))
	}
	return b.String()
}

// want adds d (1 or -1) to the connectors waiting for a first connection.
func (f *serverFleet) want(d int) {
	if f == nil {
		return
	}
	f.mu.Lock()
	f.wanting += d
	if f.wanting == 0 && f.changed != nil {
		close(f.changed)
		f.changed = nil
	}
	f.mu.Unlock()
}

// othersWaiting returns a channel closed when no connector waits for a
// first connection any more, or nil when none waits.
func (f *serverFleet) othersWaiting() <-chan struct{} {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.wanting == 0 {
		return nil
	}
	if f.changed == nil {
		f.changed = make(chan struct{})
	}
	return f.changed
}

// tryExtra takes one of the most-1 overlapping probes of a starting server
// that the whole process may run, if one is free and the fleet's probe
// interval has passed. A starting server forks a process for each probe
// only to reject it: the overlap that keeps one pool's probes on time
// would, in every pool of a fleet, queue hundreds of them in front of the
// sessions that will get in.
func (f *serverFleet) tryExtra(most int, interval time.Duration) bool {
	if f == nil {
		return true
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if f.extra >= most-1 || now.Before(f.next) {
		return false
	}
	f.extra++
	f.next = now.Add(jitterAround(interval))
	return true
}

func (f *serverFleet) endExtra() {
	if f == nil {
		return
	}
	f.mu.Lock()
	f.extra--
	f.mu.Unlock()
}

// admittingUntil returns until when the server counts as letting the
// fleet in: for fleetWindow after a probe of some connector got in, unless
// one has failed since. Zero when it does not.
func (f *serverFleet) admittingUntil(now time.Time) time.Time {
	if f == nil {
		return time.Time{}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	until := f.upAt.Add(fleetWindow)
	if f.upAt.IsZero() || f.upAt.Before(f.downAt) || !now.Before(until) {
		return time.Time{}
	}
	return until
}

// fleetHold is how long, at most, a connector whose gate is open should
// hold a connect back because other connectors of its server still wait
// for their first connection, and what to wait on: 0 when it should dial
// now. mu is held.
func (g *dialGate) fleetHold(now time.Time) (time.Duration, <-chan struct{}) {
	if g.recoveredAt.IsZero() {
		return 0, nil
	}
	left := fleetWindow - now.Sub(g.recoveredAt)
	if left <= 0 {
		g.recoveredAt = time.Time{}
		return 0, nil
	}
	ch := g.fleet.othersWaiting()
	if ch == nil {
		return 0, nil
	}
	return left, ch
}

// wantFirst records that a caller of this connector waits for a connection
// while the gate is not open. mu is held.
func (g *dialGate) wantFirst() {
	if !g.wanting {
		g.wanting = true
		g.fleet.want(1)
	}
}

// wantDone records that this connector no longer waits for a first
// connection: its gate opened, or its last waiting caller left. mu is
// held.
func (g *dialGate) wantDone() {
	if g.wanting {
		g.wanting = false
		g.fleet.want(-1)
	}
}

// sleep waits d, unless ctx ends first or a probe of another connector
// gets in: then the server is back, and this connector's probe, paced for
// a server that was away, should go at once.
func (f *serverFleet) sleep(ctx context.Context, d time.Duration) error {
	if f == nil || d <= 0 {
		return sleepCtx(ctx, d)
	}
	f.mu.Lock()
	if f.up == nil {
		f.up = make(chan struct{})
	}
	up := f.up
	f.mu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-up:
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	return nil
}

// turn waits until this connector's probe may go and takes the turn:
// while the server is away (the last probe of the fleet failed), one
// probe runs at a time, a probe interval apart; one that has hung for
// hedgeAfter no longer holds the others. Once a probe got in, every
// connector probes at once. It reports whether a turn was taken (to be
// given back with turnEnded).
func (f *serverFleet) turn(ctx context.Context, interval, hedgeAfter time.Duration) (bool, error) {
	if f == nil {
		return false, nil
	}
	for i := 0; ; i++ {
		f.mu.Lock()
		if !f.upAt.Before(f.downAt) || i == maxTurnWaits {
			f.mu.Unlock()
			return false, nil // the server is back (or never seen away): no turns
		}
		now := time.Now()
		free := f.probing == 0 || (f.probing < maxProbes && !now.Before(f.newest.Add(hedgeAfter)))
		if free && !now.Before(f.next) {
			f.probing++
			f.newest = now
			f.next = now.Add(jitterAround(interval))
			f.mu.Unlock()
			return true, nil
		}
		wait := f.next.Sub(now)
		if f.probing > 0 {
			wait = max(wait, f.newest.Add(hedgeAfter).Sub(now))
		}
		if f.ended == nil {
			f.ended = make(chan struct{})
		}
		ended := f.ended
		f.mu.Unlock()
		t := time.NewTimer(max(wait, time.Millisecond))
		select {
		case <-t.C:
		case <-ended:
		case <-ctx.Done():
			t.Stop()
			return false, context.Cause(ctx)
		}
		t.Stop()
	}
}

// maxTurnWaits bounds the waits of one turn; past it the probe goes
// anyway.
const maxTurnWaits = 1000

// probed records how a probe of a down connector ended: whether it took a
// turn, got in, or failed in a way that says the server is still away.
func (f *serverFleet) probed(took, gotIn, away bool) {
	if f == nil {
		return
	}
	f.mu.Lock()
	now := time.Now()
	if took {
		f.probing--
	}
	switch {
	case gotIn:
		f.upAt, f.next = now, time.Time{}
		if f.up != nil {
			close(f.up)
			f.up = nil
		}
	case away:
		f.downAt = now
	}
	if f.ended != nil {
		close(f.ended)
		f.ended = nil
	}
	f.mu.Unlock()
}

// gotIn records a connect that got in while the gate was open: if the
// fleet believed the server away, it is back.
func (f *serverFleet) gotIn() {
	if f == nil {
		return
	}
	f.mu.Lock()
	away := f.upAt.Before(f.downAt)
	f.mu.Unlock()
	if away {
		f.probed(false, true, false)
	}
}
