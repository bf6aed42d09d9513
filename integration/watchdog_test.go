package integration

import (
	"bytes"
	"runtime"
	"testing"
	"time"
)

// awaitWorkers waits for done. Every worker loop in this package is bounded
// in count and time and every query has its own timeout, so if done is not
// closed within limit something ignored its context: it reports the stacks
// that run through the wrapper or pgx's background reader, calls the pool's
// rescue (which ends only the pool's own sessions, so that blocked reads
// return), and waits up to 10 s more before giving up.
func awaitWorkers(t testing.TB, done <-chan struct{}, limit time.Duration, p *pool) {
	t.Helper()
	select {
	case <-done:
		return
	case <-time.After(limit):
	}
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	t.Errorf("workers still running %v after start although every query has a timeout: a call ignored its context. Stacks:\n%s",
		limit, relevantStacks(buf))
	if p != nil && p.rescue != nil {
		p.rescue()
	}
	select {
	case <-done:
		t.Logf("the blocked workers returned once the pool's own sessions were terminated")
	case <-time.After(10 * time.Second):
		t.Fatalf("workers still blocked after the rescue; abandoning them")
	}
}

// relevantStacks keeps the goroutine stacks that mention the wrapper or
// pgconn's background reader.
func relevantStacks(all []byte) []byte {
	var out []byte
	for g := range bytes.SplitSeq(all, []byte("\n\n")) {
		if bytes.Contains(g, []byte("resilientpg/resilientpg.")) || bytes.Contains(g, []byte("bgreader")) {
			out = append(append(out, g...), "\n\n"...)
		}
	}
	if out == nil {
		return all
	}
	return out
}
