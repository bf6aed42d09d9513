package resilientpg

import (
	"log/slog"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// What a driver can see of a checkout, and so what leak detection can: a
// used connection is checked out at ResetSession, in the borrower's
// goroutine; a fresh one at its first call (query, exec, begin, prepare,
// ping). It is back at IsValid or Close. A fresh connection taken by
// db.Conn and used only through Conn.Raw makes no call the wrapper sees, and
// the time a caller waits for a free connection is invisible to any driver.

// stackDepth is how many frames a checkout keeps: enough to get past
// database/sql and an ORM or two to the user's code.
const stackDepth = 32

// checkout is a connection's borrow record. The fields after mu are
// written only with leak detection on, under mu, since the leak watcher
// reads them from its own goroutine.
type checkout struct {
	since atomic.Int64 // nanoseconds after the tracker's epoch, plus one; 0: not out

	mu     sync.Mutex
	stack  [stackDepth]uintptr // the borrower's stack, preallocated so capturing allocates nothing
	depth  int
	leaked bool // leak.suspected was reported for this checkout
}

// tracker is the connector's registry of live connections, for the
// checked-out gauge, the oldest checkout, leak reports and exhaustion
// reports. Connections join at connect and leave at close, off the hot path.
type tracker struct {
	epoch time.Time
	mu    sync.Mutex
	conns map[*conn]struct{}

	// wave is when the current wave of connections found dead began, for
	// everySessionEnded.
	wave struct {
		mu  sync.Mutex
		gen uint64
		at  time.Time
	}
}

func (t *tracker) add(c *conn) {
	t.mu.Lock()
	if t.conns == nil {
		t.conns = make(map[*conn]struct{})
	}
	t.conns[c] = struct{}{}
	t.mu.Unlock()
}

func (t *tracker) remove(c *conn) {
	t.mu.Lock()
	delete(t.conns, c)
	t.mu.Unlock()
}

func (t *tracker) stamp(now time.Time) int64 { return int64(now.Sub(t.epoch)) + 1 }

// oldest returns how long the longest-held connection has been out.
func (t *tracker) oldest(now time.Time) (time.Duration, bool) {
	var min int64
	t.mu.Lock()
	for c := range t.conns {
		if s := c.out.since.Load(); s != 0 && (min == 0 || s < min) {
			min = s
		}
	}
	t.mu.Unlock()
	if min == 0 {
		return 0, false
	}
	return time.Duration(t.stamp(now) - min), true
}

// heldConn is one checkout as the reports show it.
type heldConn struct {
	id     int64
	held   time.Duration
	txOpen bool
	stack  string
}

// LogValue renders a checkout for pool.exhausted's "oldest" list.
func (h heldConn) LogValue() slog.Value {
	attrs := []slog.Attr{slog.Int64("conn", h.id), slog.Duration("held", h.held), slog.Bool("tx_open", h.txOpen)}
	if h.stack != "" {
		attrs = append(attrs, slog.String("stack", h.stack))
	}
	return slog.GroupValue(attrs...)
}

// held lists the connections out now, longest-held first, at most n.
func (t *tracker) held(now time.Time, n int, stacks bool) []heldConn {
	var out []heldConn
	t.mu.Lock()
	for c := range t.conns {
		if s := c.out.since.Load(); s != 0 {
			h := heldConn{id: c.id, held: time.Duration(t.stamp(now) - s), txOpen: c.txFlag.Load()}
			if stacks {
				c.out.mu.Lock()
				h.stack = formatStack(c.out.stack[:c.out.depth])
				c.out.mu.Unlock()
			}
			out = append(out, h)
		}
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b heldConn) int { return int(b.held - a.held) })
	if len(out) > n {
		out = out[:n]
	}
	return out
}

// markOut records a checkout: the counters, and with leak detection on the
// borrower's stack. It allocates nothing.
func (c *conn) markOut(now time.Time) {
	k := &c.c.stats
	k.checkedOut.Add(1)
	stamp := c.c.track.stamp(now)
	if c.c.opts.LeakThreshold <= 0 {
		c.out.since.Store(stamp)
		return
	}
	c.out.mu.Lock()
	// Skip runtime.Callers, markOut and its caller in this package; the
	// rest is trimmed when the stack is shown.
	c.out.depth = runtime.Callers(3, c.out.stack[:])
	c.out.leaked = false
	c.out.since.Store(stamp)
	c.out.mu.Unlock()
}

// markBack records a return (IsValid or Close) of a checked-out connection.
func (c *conn) markBack(now time.Time) {
	if c.c.opts.LeakThreshold <= 0 {
		if c.out.since.Swap(0) != 0 {
			c.c.stats.checkedOut.Add(-1)
		}
		return
	}
	c.out.mu.Lock()
	since := c.out.since.Swap(0)
	leaked := c.out.leaked
	c.out.leaked = false
	c.out.mu.Unlock()
	if since == 0 {
		return
	}
	c.c.stats.checkedOut.Add(-1)
	if leaked {
		c.c.stats.leaksReturned.Add(1)
		c.c.ev.emit(evLeakReturned, slog.LevelInfo, "resilientpg: a connection reported as leaked was returned",
			slog.Int64("conn", c.id), slog.Duration("held", time.Duration(c.c.track.stamp(now)-since)))
	}
}

// scanLeaks reports, once each, the checkouts held past the threshold.
func (c *Connector) scanLeaks(now time.Time) {
	limit := int64(c.opts.LeakThreshold)
	type leak struct {
		id     int64
		held   time.Duration
		txOpen bool
		stack  string
	}
	var found []leak
	c.track.mu.Lock()
	for w := range c.track.conns {
		w.out.mu.Lock()
		if s := w.out.since.Load(); s != 0 && !w.out.leaked && c.track.stamp(now)-s >= limit {
			w.out.leaked = true
			found = append(found, leak{w.id, time.Duration(c.track.stamp(now) - s), w.txFlag.Load(),
				formatStack(w.out.stack[:w.out.depth])})
		}
		w.out.mu.Unlock()
	}
	c.track.mu.Unlock()
	for _, l := range found {
		c.stats.leaksSuspected.Add(1)
		c.ev.emit(evLeakSuspected, slog.LevelWarn, "resilientpg: connection held past resilient_leak_threshold, possibly leaked",
			slog.Int64("conn", l.id), slog.Duration("held", l.held), slog.Duration("threshold", c.opts.LeakThreshold),
			slog.Bool("tx_open", l.txOpen), slog.String("stack", l.stack))
	}
}

// libraryFrames are the packages whose frames are trimmed from the top of
// a borrower's stack, so that its first frame is the user's own code:
// database/sql, this package, the drivers, and the libraries people stack
// on *sql.DB (the ones the examples module tests).
var libraryFrames = []string{
	"runtime.", "database/sql.", "github.com/resilientpg/resilientpg.",
	"github.com/jackc/pgx/", "github.com/go-sql-driver/mysql.",
	"github.com/jmoiron/sqlx.", "gorm.io/", "github.com/uptrace/bun", "entgo.io/ent",
	"github.com/XSAM/otelsql.", "go.opentelemetry.io/", "github.com/pressly/goose/",
	"github.com/golang-migrate/migrate/",
}

// isLibraryFrame reports whether a frame belongs to the libraries above. A
// _test.go file never does: a library's tests are not on a user's call path,
// and this package's own tests are the user there.
func isLibraryFrame(f runtime.Frame) bool {
	if strings.HasSuffix(f.File, "_test.go") {
		return false
	}
	for _, p := range libraryFrames {
		if strings.HasPrefix(f.Function, p) {
			return true
		}
	}
	return false
}

// formatStack renders a stack as one "file:line function" per line, with
// the library frames on top trimmed.
func formatStack(pcs []uintptr) string {
	if len(pcs) == 0 {
		return ""
	}
	var b strings.Builder
	frames := runtime.CallersFrames(pcs)
	user := false
	for {
		f, more := frames.Next()
		if user || !isLibraryFrame(f) {
			user = true
			if b.Len() > 0 {
				b.WriteByte('\n')
			}
			b.WriteString(f.File)
			b.WriteByte(':')
			b.WriteString(strconv.Itoa(f.Line))
			b.WriteByte(' ')
			b.WriteString(f.Function)
		}
		if !more {
			break
		}
	}
	return b.String()
}
