package integration

import (
	"database/sql"
	"database/sql/driver"
	"fmt"
	"strings"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/eventlog"
)

// openWrapperDB opens the wrapper's pool of a scenario with its events
// (info and up) kept in log, so the scenario can check the wrapper's own
// account of a fault next to what the application saw.
func (env *scEnv) openWrapperDB(dsn string, log *eventlog.Recorder) *sql.DB {
	env.t.Helper()
	opts := resilientpg.DefaultOptions()
	opts.Log, opts.Logger = resilientpg.LogInfo, log.Logger()
	var inner driver.Driver = stdlib.GetDefaultDriver()
	if !env.e.pg {
		inner = &mysql.MySQLDriver{}
	}
	c, err := resilientpg.NewConnector(inner, opts, dsn)
	if err != nil {
		env.t.Fatalf("resilientpg.NewConnector: %v", err)
	}
	return sql.OpenDB(c)
}

// stats is the wrapper's counters for p.
func (env *scEnv) stats(p *scPool) resilientpg.Stats {
	env.t.Helper()
	s, ok := resilientpg.StatsOf(p.db)
	if !ok {
		env.t.Fatalf("%s: StatsOf found no wrapper", p.name)
	}
	return s
}

// account is the wrapper's own account of a scenario, for the table's note
// and the demo: discards by reason, invalidations, probes, time down.
func account(s resilientpg.Stats) string {
	var parts []string
	for i, n := range s.Discards {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", resilientpg.DiscardReason(i), n))
		}
	}
	for i, n := range s.ReturnsRejected {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%s at return %d", resilientpg.DiscardReason(i), n))
		}
	}
	out := "discards: none"
	if len(parts) > 0 {
		out = "discards: " + strings.Join(parts, ", ")
	}
	if n := s.Invalidations.Total(); n > 0 {
		var causes []string
		for i, k := range s.Invalidations {
			if k > 0 {
				causes = append(causes, fmt.Sprintf("%s %d", resilientpg.InvalidationCause(i), k))
			}
		}
		out += "; invalidations: " + strings.Join(causes, ", ")
	}
	if s.Gate.Outages > 0 {
		out += fmt.Sprintf("; %d outage(s), down %v, %d probes", s.Gate.Outages, s.Gate.Downtime.Round(time.Millisecond), s.Gate.Probes)
	}
	return out
}

// checkDiscards asserts the wrapper discarded exactly want connections for
// the reasons in allowed, and notes its account.
func (env *scEnv) checkDiscards(p *scPool, want int64, allowed ...resilientpg.DiscardReason) resilientpg.Stats {
	env.t.Helper()
	s := env.stats(p)
	p.note += "; " + account(s)
	var n int64
	for _, r := range allowed {
		n += s.Discards[r]
	}
	if n != want || s.Discards.Total() != want {
		env.t.Errorf("%s: discards %v (%s), want exactly %d, all of them %v", p.name, s.Discards, account(s), want, allowed)
	}
	return s
}

// checkOutageEvents asserts one server.down and one server.up, whose
// downtime is within 0.5 s of the real one: from the stop to the moment
// the server accepted sessions again.
func (env *scEnv) checkOutageEvents(p *scPool, f scFault) {
	env.t.Helper()
	down, up := p.log.Events("server.down"), p.log.Events("server.up")
	if len(down) != 1 || len(up) != 1 {
		env.t.Errorf("%s: %d server.down and %d server.up events, want 1 and 1", p.name, len(down), len(up))
		return
	}
	real := f.up - f.stopBegin
	got := up[0].Attrs["downtime"].Duration()
	p.note += fmt.Sprintf("; server.up downtime %v (real %v)", got.Round(time.Millisecond), real.Round(time.Millisecond))
	if d := got - real; d < -500*time.Millisecond || d > 500*time.Millisecond {
		env.t.Errorf("%s: server.up downtime %v, real outage %v (stop %v .. accepting %v): want within 0.5s",
			p.name, got, real, fmtDur(f.stopBegin), fmtDur(f.up))
	}
	if s := env.stats(p); s.Gate.Outages != 1 {
		env.t.Errorf("%s: Gate.Outages = %d, want 1", p.name, s.Gate.Outages)
	}
}
