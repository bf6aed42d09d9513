package integration

import (
	"context"
	"database/sql"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg"
)

// credOp is one operation of the load: when it started and ended (since
// the load started), the session and user that answered, or its error.
type credOp struct {
	start, end time.Duration
	id         int64
	user       string
	err        error
}

// credLoad runs credWorkers workers issuing the lab's id query back to
// back on a pool of as many connections. Each query is marked idempotent
// (it is a read), so that one killed in flight is retried, and has its own
// timeout; each worker is bounded by credOpsPerWorker and by stop.
type credLoad struct {
	start time.Time
	stop  chan struct{}
	done  chan struct{}

	mu  sync.Mutex
	ops []credOp
}

func startCredLoad(t *testing.T, db *sql.DB, query string) *credLoad {
	t.Helper()
	db.SetMaxOpenConns(credWorkers)
	db.SetMaxIdleConns(credWorkers)
	l := &credLoad{start: time.Now(), stop: make(chan struct{}), done: make(chan struct{})}
	ctx := resilientpg.WithIdempotent(ctxT(t, 2*time.Minute))
	var wg sync.WaitGroup
	for range credWorkers {
		wg.Go(func() {
			for range credOpsPerWorker {
				select {
				case <-l.stop:
					return
				default:
				}
				op := credOp{start: time.Since(l.start)}
				qctx, cancel := context.WithTimeout(ctx, credOpTimeout)
				var n int64
				op.err = db.QueryRowContext(qctx, query).Scan(&op.id, &op.user, &n)
				cancel()
				op.end = time.Since(l.start)
				l.mu.Lock()
				l.ops = append(l.ops, op)
				l.mu.Unlock()
			}
		})
	}
	go func() { wg.Wait(); close(l.done) }()
	// Under way: every worker has a session of its own.
	for range 500 {
		if len(l.sessions(time.Since(l.start))) >= credWorkers {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return l
}

// sessions returns the sessions that answered an operation ending before until.
func (l *credLoad) sessions(until time.Duration) map[int64]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[int64]bool{}
	for _, op := range l.ops {
		if op.err == nil && op.end < until {
			seen[op.id] = true
		}
	}
	return seen
}

func (l *credLoad) stopAndWait(t *testing.T) []credOp {
	t.Helper()
	close(l.stop)
	awaitWorkers(t, l.done, 30*time.Second, nil)
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ops
}

type span struct{ first, last time.Duration }

// spans returns when each session was first and last seen answering.
func (l *credLoad) spans(ops []credOp) map[int64]span {
	out := map[int64]span{}
	for _, op := range ops {
		if op.err != nil {
			continue
		}
		s, ok := out[op.id]
		if !ok {
			s.first = op.start
		}
		s.last = op.end
		out[op.id] = s
	}
	return out
}

type credReport struct {
	failed       int
	errs         []string
	after        int           // operations started after the event's end
	afterOnOld   int           // of which answered by a session from before it
	newSessions  int           // sessions that answered after the event began and not before
	firstNew     time.Duration // from the event's start to the first answer from a new session
	slowestAfter time.Duration
}

// analyse summarises ops around an event, from `from` to `to`, that ended
// the sessions in old.
func analyse(ops []credOp, old map[int64]bool, from, to time.Duration) credReport {
	var r credReport
	fresh := map[int64]bool{}
	r.firstNew = -1
	for _, op := range ops {
		if op.err != nil {
			r.failed++
			if len(r.errs) < 3 {
				r.errs = append(r.errs, op.err.Error())
			}
			continue
		}
		if op.end >= from && !old[op.id] {
			fresh[op.id] = true
			if r.firstNew < 0 || op.end-from < r.firstNew {
				r.firstNew = op.end - from
			}
		}
		if op.start < to {
			continue
		}
		r.after++
		r.slowestAfter = max(r.slowestAfter, op.end-op.start)
		if old[op.id] {
			r.afterOnOld++
		}
	}
	r.newSessions = len(fresh)
	return r
}

// openWithOptions opens a pool on the lab's server as user with
// Options.Credentials set to fn.
func (l *authLab) openWithOptions(t *testing.T, user string, fn func(context.Context) (resilientpg.Credentials, error)) *sql.DB {
	t.Helper()
	o := resilientpg.DefaultOptions()
	o.Credentials = fn
	db, err := resilientpg.OpenDB(l.inner, o, l.dsn(user, ""))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func writeText(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

type errorString string

func (e errorString) Error() string { return string(e) }
