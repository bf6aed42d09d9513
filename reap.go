package resilientpg

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// A connection discarded because its path died (a NAT or load balancer
// dropped the flow, a host vanished) leaves its server session behind: the
// server never hears the close, and its own keepalive (about 2 h by
// default) or MariaDB's wait_timeout (8 h) ends it much later, while it
// keeps its slot, its locks and any open transaction. Only the client
// knows which sessions it abandoned, so the reaper ends them: over a
// connection of its own to the same server, it checks that the session
// is the one the discarded connection had, then PostgreSQL's
// pg_terminate_backend or MySQL's KILL ends it. A role may end its own
// sessions, so no extra privilege is needed.

// ReapStats is the reaper's account (Stats.Reap). Orphans minus the four
// outcomes is what is still queued, or was left when reaping went off.
type ReapStats struct {
	Orphans int64 // connections discarded on a dead path, whose server session may live on
	Reaped  int64 // their sessions ended
	NotOurs int64 // skipped: the server's session of that id is not provably the connection's (a pooler or proxy in the path, another client address, port or start)
	Gone    int64 // the session had already ended
	Failed  int64 // not done: no connection to the server, a timeout, an error, a full queue, a permission refused
	// Off is true when a permission error switched reaping off for this
	// pool, or resilient_reap=off.
	Off bool
}

// ReapOutcome is what became of an orphan's session. Its String is the
// label exporters use: reaped, not_ours, gone, failed.
type ReapOutcome uint8

const (
	ReapReaped  ReapOutcome = iota // ended
	ReapNotOurs                    // left alone: not provably the connection's
	ReapGone                       // it had already ended
	ReapFailed                     // not done
	numReapOutcomes
)

var reapLabels = [numReapOutcomes]string{"reaped", "not_ours", "gone", "failed"}

func (o ReapOutcome) String() string {
	if o < numReapOutcomes {
		return reapLabels[o]
	}
	return "ReapOutcome(" + strconv.Itoa(int(o)) + ")"
}

// ReapOutcomeCounts counts by ReapOutcome: counts[ReapGone].
type ReapOutcomeCounts [numReapOutcomes]int64

// ByOutcome returns the outcome counters indexed by ReapOutcome, for
// exporters that label them.
func (r ReapStats) ByOutcome() ReapOutcomeCounts {
	return ReapOutcomeCounts{ReapReaped: r.Reaped, ReapNotOurs: r.NotOurs, ReapGone: r.Gone, ReapFailed: r.Failed}
}

// Reaping limits: at most reapRate sessions a second after a burst of
// reapBurst (a pool of 10 that lost every flow is reaped in about a
// second and a half), each identity check and end within reapTimeout, and
// at most reapQueueMax waiting.
const (
	reapInterval = 200 * time.Millisecond // 5 a second
	reapBurst    = 5
	reapTimeout  = 2 * time.Second
	reapConnect  = 5 * time.Second // bound on the reaper's own connect
	reapLinger   = time.Second     // the reaper's connection outlives the last orphan by this
	reapQueueMax = 64
)

// orphan is what the wrapper knows of the server session behind one of
// its connections, recorded at connect at no cost: the id the server sent
// in the handshake and the connection's own address, which the server
// sees as its client's.
type orphan struct {
	id    uint32         // PostgreSQL backend pid, MySQL connection id; 0 unknown
	local netip.AddrPort // invalid for a Unix socket
	start time.Time      // the connect began
	born  time.Time      // the connect ended: a PostgreSQL backend starts in between
}

// known reports whether the orphan can be checked at all.
func (o orphan) known() bool { return o.id != 0 && o.local.IsValid() }

// addrPort converts a socket address; anything but TCP is invalid.
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// identify records the server session of a new connection.
func identify(w *conn, d dialed, now time.Time) orphan {
	o := orphan{start: d.start, born: now}
	switch {
	case w.pg != nil:
		o.id = w.pg.PID()
		o.local = addrPort(w.pg.Conn().LocalAddr())
	case w.wire != nil:
		o.id = w.wire.id
		o.local = addrPort(w.wire.LocalAddr())
	}
	return o
}

// reapOutcome is what one attempt came to.
type reapOutcome uint8

const (
	reapEnded reapOutcome = iota
	reapNotOurs
	reapGone
	reapFailed
	reapDenied // a permission error: reaping goes off
)

// reapSession is a connection the reaper works through.
type reapSession interface {
	// reap checks that the server's session o.id is o's and ends it.
	reap(ctx context.Context, o orphan) (reapOutcome, error)
	Close() error
}

// reaper ends orphaned sessions, on a goroutine of its own that runs only
// while there are orphans (and reapLinger after), and that Connector.Close
// stops and waits for.
type reaper struct {
	c    *Connector
	open func(ctx context.Context) (reapSession, error) // nil: the driver shows no session ids

	mu      sync.Mutex
	queue   []orphan
	running bool          // a goroutine serves the queue
	closed  bool          // Close was called: no more goroutines
	stop    chan struct{} // closed by close
	wake    chan struct{} // an orphan was queued
	wg      sync.WaitGroup
	off     atomic.Bool

	pace pacer // owned by the running goroutine
}

// enqueue hands the reaper the session of a connection just discarded on
// a dead path. It never blocks.
func (r *reaper) enqueue(o orphan) {
	r.c.stats.reapOrphans.Add(1)
	if r.open == nil || r.off.Load() {
		return
	}
	if !o.known() {
		r.c.reapDone(o, reapNotOurs, nil) // a Unix socket, or an id the driver hid: nothing to prove it by
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	if len(r.queue) >= reapQueueMax {
		r.c.reapDone(o, reapFailed, errReapQueueFull)
		return
	}
	r.queue = append(r.queue, o)
	if r.stop == nil {
		r.stop, r.wake = make(chan struct{}), make(chan struct{}, 1)
	}
	select {
	case r.wake <- struct{}{}:
	default:
	}
	if !r.running {
		r.running = true
		r.wg.Add(2)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { // ends the current step at once when the pool closes
			defer r.wg.Done()
			select {
			case <-r.stop:
				cancel()
			case <-done:
			}
		}()
		go func() {
			defer r.wg.Done()
			defer close(done)
			defer cancel()
			r.run(ctx)
		}()
	}
}

// close stops the goroutine and waits for it; later orphans are dropped.
func (r *reaper) close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	r.queue = nil
	if r.stop != nil {
		close(r.stop)
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// next takes the next orphan, waiting up to reapLinger for one; false
// means stop: closed, or nothing came, in which case the goroutine ends
// (the next orphan starts another).
func (r *reaper) next(ctx context.Context) (orphan, bool) {
	linger := time.NewTimer(reapLinger)
	defer linger.Stop()
	for {
		r.mu.Lock()
		if len(r.queue) > 0 && !r.closed {
			o := r.queue[0]
			r.queue = r.queue[1:]
			r.mu.Unlock()
			return o, true
		}
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return orphan{}, false
		case <-r.wake:
		case <-linger.C:
			r.mu.Lock()
			defer r.mu.Unlock()
			if len(r.queue) > 0 && !r.closed {
				o := r.queue[0]
				r.queue = r.queue[1:]
				return o, true
			}
			r.running = false
			return orphan{}, false
		}
	}
}

func (r *reaper) run(ctx context.Context) {
	var s reapSession
	defer func() {
		if s != nil {
			s.Close()
		}
	}()
	for {
		o, ok := r.next(ctx)
		if !ok {
			return
		}
		if wait := r.pace.delay(time.Now()); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		if s == nil {
			cctx, cancel := context.WithTimeout(ctx, reapConnect)
			var err error
			s, err = r.open(cctx)
			cancel()
			if err != nil {
				s = nil
				r.c.reapDone(o, reapFailed, err)
				continue
			}
		}
		rctx, cancel := context.WithTimeout(ctx, reapTimeout)
		out, err := s.reap(rctx, o)
		cancel()
		if out == reapFailed || out == reapDenied {
			s.Close() // it may be broken; the next orphan connects afresh
			s = nil
		}
		if out == reapDenied {
			// Counted once; the rest of the queue is dropped, since every
			// attempt would be refused the same way.
			if r.off.CompareAndSwap(false, true) {
				r.c.reapDone(o, reapDenied, err)
			}
			r.mu.Lock()
			r.queue = nil
			r.mu.Unlock()
			continue
		}
		r.c.reapDone(o, out, err)
	}
}

// pacer spaces events at least interval apart after a burst: the
// generic cell rate algorithm, with tat the theoretical arrival time of
// the next event.
type pacer struct {
	interval time.Duration
	burst    int
	tat      time.Time
}

// delay reserves the next slot and returns how long to wait for it.
func (p *pacer) delay(now time.Time) time.Duration {
	interval, burst := p.interval, p.burst
	if interval == 0 {
		interval, burst = reapInterval, reapBurst
	}
	earliest := now.Add(-time.Duration(burst-1) * interval) // a full bucket lets burst go at once
	if p.tat.Before(earliest) {
		p.tat = earliest
	}
	wait := max(p.tat.Sub(now), 0)
	p.tat = p.tat.Add(interval)
	return wait
}

// reapDone counts an outcome and logs it.
func (c *Connector) reapDone(o orphan, out reapOutcome, err error) {
	k := &c.stats
	var level slog.Level
	var ev event
	var msg string
	switch out {
	case reapEnded:
		k.reaped.Add(1)
		ev, level, msg = evSessionReaped, slog.LevelInfo, "resilientpg: ended the server session of a connection lost on a dead path"
	case reapGone:
		k.reapGone.Add(1)
		ev, level, msg = evSessionReaped, slog.LevelDebug, "resilientpg: the session of a connection lost on a dead path had already ended"
	case reapNotOurs:
		k.reapNotOurs.Add(1)
		ev, level, msg = evReapSkipped, slog.LevelInfo, "resilientpg: left a server session alone: not provably the lost connection's"
	case reapDenied:
		k.reapFailed.Add(1)
		ev, level, msg = evReapFailed, slog.LevelWarn, "resilientpg: not allowed to end sessions: reaping is off for this pool"
	default:
		k.reapFailed.Add(1)
		ev, level, msg = evReapFailed, slog.LevelWarn, "resilientpg: could not end the server session of a connection lost on a dead path"
	}
	if !c.ev.enabled(level) {
		return
	}
	attrs := []slog.Attr{slog.Uint64("session", uint64(o.id)), slog.String("client", o.local.String()),
		slog.String("outcome", reapOutcomeNames[out])}
	if err != nil {
		attrs = append(attrs, errAttrs(err)...)
	}
	c.ev.emit(ev, level, msg, attrs...)
}

var reapOutcomeNames = [...]string{reapEnded: "reaped", reapNotOurs: "not_ours", reapGone: "gone", reapFailed: "failed", reapDenied: "denied"}

// reapStats is the reaper's part of a Stats snapshot.
func (c *Connector) reapStats() ReapStats {
	k := &c.stats
	return ReapStats{Orphans: k.reapOrphans.Load(), Reaped: k.reaped.Load(), NotOurs: k.reapNotOurs.Load(),
		Gone: k.reapGone.Load(), Failed: k.reapFailed.Load(), Off: c.reap.open == nil || c.reap.off.Load()}
}
