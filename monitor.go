package resilientpg

import (
	"database/sql"
	"log/slog"
	"strconv"
	"sync"
	"time"
)

// monitor is the connector's one background goroutine, started only when
// something needs it (leak detection; the exhaustion watch of a *sql.DB the
// package opened, while logging or metrics are on) and stopped by Close,
// that is by db.Close.
type monitor struct {
	mu      sync.Mutex
	running bool // guarded by mu
	closed  bool // guarded by mu
	exhaust bool // guarded by mu: poll db.Stats for exhaustion
	stop    chan struct{}
	done    chan struct{}

	// Owned by the goroutine.
	lastPoll  time.Time
	fullSince time.Time // zero: the pool was not full at the last poll
	waitBase  int64     // WaitCount at the last poll the pool was not full
	lastShown time.Time // the last pool.exhausted report
}

// exhaustionPoll is how often db.Stats is read, and how long the pool must
// stay full with callers waiting before it is reported.
const exhaustionPoll = time.Second

// exhaustionRepeat is how often an exhaustion that goes on is reported again.
const exhaustionRepeat = time.Minute

// startMonitor starts the goroutine if it is not running; exhaust turns the
// exhaustion watch on.
func (c *Connector) startMonitor(exhaust bool) {
	m := &c.mon
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.exhaust = m.exhaust || exhaust
	if m.running {
		return
	}
	m.running = true
	m.stop, m.done = make(chan struct{}), make(chan struct{})
	go c.runMonitor(m.stop, m.done)
}

// watchExhaustion turns the exhaustion watch on for a *sql.DB the package
// opened; other *sql.DBs are not known to the connector.
func (c *Connector) watchExhaustion() {
	if c.db != nil {
		c.startMonitor(true)
	}
}

// stopMonitor ends the goroutine and waits for it.
func (c *Connector) stopMonitor() {
	m := &c.mon
	m.mu.Lock()
	m.closed = true
	running := m.running
	m.running = false
	m.mu.Unlock()
	if running {
		close(m.stop)
		<-m.done
	}
}

func (c *Connector) runMonitor(stop, done chan struct{}) {
	defer close(done)
	tick := exhaustionPoll
	if t := c.opts.LeakThreshold / 4; t > 0 && t < tick {
		tick = max(t, 5*time.Millisecond) // a leak is seen within 1.25 thresholds
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			if c.opts.LeakThreshold > 0 {
				c.scanLeaks(now)
			}
			c.mon.mu.Lock()
			exhaust := c.mon.exhaust
			c.mon.mu.Unlock()
			if exhaust && now.Sub(c.mon.lastPoll) >= exhaustionPoll-tick/2 {
				c.mon.lastPoll = now
				c.pollExhaustion(now, c.db.Stats())
			}
		}
	}
}

// pollExhaustion reports a pool whose every connection has been in use for
// more than a second while callers started waiting, with its oldest
// checkouts: a few long-held ones point to a leak, many short ones to load.
func (c *Connector) pollExhaustion(now time.Time, st sql.DBStats) {
	m := &c.mon
	full := st.MaxOpenConnections > 0 && st.InUse >= st.MaxOpenConnections
	if !full {
		m.fullSince, m.waitBase = time.Time{}, st.WaitCount
		return
	}
	if m.fullSince.IsZero() {
		m.fullSince = now
	}
	waits := st.WaitCount - m.waitBase
	if waits == 0 || now.Sub(m.fullSince) < exhaustionPoll || now.Sub(m.lastShown) < exhaustionRepeat {
		return
	}
	m.lastShown = now
	c.stats.poolExhausted.Add(1)
	if !c.ev.enabled(slog.LevelWarn) {
		return
	}
	held := c.track.held(now, 5, c.opts.LeakThreshold > 0)
	oldest := make([]slog.Attr, len(held))
	for i, h := range held {
		oldest[i] = slog.Attr{Key: strconv.Itoa(i + 1), Value: h.LogValue()}
	}
	c.ev.emit(evPoolExhausted, slog.LevelWarn, "resilientpg: every connection is in use and callers are waiting",
		slog.Int("in_use", st.InUse), slog.Int("max_open", st.MaxOpenConnections),
		slog.Int64("waits_started", waits), slog.Duration("full_for", now.Sub(m.fullSince)),
		slog.Duration("wait_duration_total", st.WaitDuration), slog.Attr{Key: "oldest", Value: slog.GroupValue(oldest...)})
}
