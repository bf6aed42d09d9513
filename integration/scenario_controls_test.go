package integration

import (
	"testing"
	"time"

	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// scControlOps bounds each worker of the fail-fast control: with the
// server known down and resilient_connect_wait=0 an operation fails
// without any I/O, so the workers spin.
const scControlOps = 100_000

// TestScenarioControls shows that the scenario suite can fail: it runs two
// of its scenarios with the wrapper's mechanism for them switched off and
// asserts that failures do occur.
func TestScenarioControls(t *testing.T) {
	for _, e := range scEngines {
		t.Run(e.name, func(t *testing.T) {
			// (a) Without a checkout ping, black-holed connections reach the
			// application, which waits out its 5 s deadline on each.
			t.Run("half-open-idle-2s+ping=never", func(t *testing.T) {
				env := newScEnv(t, e)
				pr := env.newProxy(env.srv.addr())
				p := env.openPool(e.wrapper, true, pr, env.srv.dsn(pr.Addr(), "resilient_ping=never"))
				env.warm([]*scPool{p}, "SELECT 1")
				time.Sleep(2 * time.Second)
				n := pr.BlackholeAll()
				env.burst([]*scPool{p}, scHalfOpenN, scBurstC, selectOne)
				s := summarize(p.rec.snapshot())
				t.Logf("control %s with resilient_ping=never: %d conns black-holed; %d ops, %d FAILED, p99 %v; first error: %s",
					p.name, n, s.ops, s.failed, fmtDur(s.p99), s.firstErr)
				if s.failed == 0 {
					t.Errorf("control: no operation failed with the checkout ping off; the half-open scenario cannot tell the mechanism works")
				}
			})
			// (b) Without waiting for a server known to be down, every
			// operation during the outage fails at once.
			t.Run("outage-3s-under-load+connect_wait=0", func(t *testing.T) {
				env := newScEnv(t, e)
				pr := env.newProxy(env.srv.addr())
				p := env.openPool(e.wrapper, true, pr, env.srv.dsn(pr.Addr(), "resilient_connect_wait=0"))
				ps := []*scPool{p}
				env.warm(ps, "SELECT 1")
				f := env.stopStartUnderLoad(ps, faultlab.StopImmediate, scOutage, scControlOps, selectOne)
				s := summarize(p.rec.snapshot())
				fs := faultStats(p, f)
				// When the wrapper with its defaults has recovered at the latest.
				recovered := f.up + scBackoffMax + 500*time.Millisecond
				var after, afterFailed int
				var afterErr string
				for _, o := range p.rec.snapshot() {
					if o.start >= recovered {
						after++
						if o.err != nil {
							afterFailed++
							afterErr = o.err.Error()
						}
					}
				}
				t.Logf("control %s with resilient_connect_wait=0: %d ops, %d FAILED (in flight at the stop: %d), p99 %v; first error: %s",
					p.name, s.ops, s.failed, fs.inflight, fmtDur(s.p99), s.firstErr)
				t.Logf("control %s: of the %d ops started >= %v after the server accepted again, %d failed (last error: %s); "+
					"connects reaching the proxy from the stop to the end: %d, after the start returned: %d",
					p.name, after, recovered-f.up, afterFailed, afterErr,
					p.proxy.Accepted()-f.accStop[p], p.proxy.Accepted()-f.accStartEnd[p])
				// Failing fast must not mean failing forever: a probe still goes
				// out at each backoff slot, so the gate opens again.
				if after == 0 || afterFailed > 0 {
					t.Errorf("resilient_connect_wait=0: %d of %d ops failed once the server had been back for %v: the pool did not recover",
						afterFailed, after, recovered-f.up)
				}
				if s.failed <= 10*scLoadWorkers {
					t.Errorf("control: %d operations failed with resilient_connect_wait=0, want far above %d (> %d)",
						s.failed, scLoadWorkers, 10*scLoadWorkers)
				}
			})
		})
	}
}
