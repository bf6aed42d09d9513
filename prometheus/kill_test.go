package resilientprom_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/resilientpg/resilientpg"
	resilientprom "github.com/resilientpg/resilientpg/prometheus"
)

// TestKilledSessionsReachTheCollector kills every session of a full pool
// on a real server and reads the ten discards back through the collector.
// The counts are exact (see checkDiscards), read back both ways.
func TestKilledSessionsReachTheCollector(t *testing.T) {
	for _, e := range []struct {
		name   string
		target func(*testing.T) target
	}{
		{"postgres", postgres},
		{"mariadb", mariadb},
	} {
		t.Run(e.name, func(t *testing.T) {
			db := killScenario(t, e.target(t))
			reg := prometheus.NewPedanticRegistry()
			reg.MustRegister(resilientprom.NewCollector(db, e.name))
			got := gather(t, reg, e.name)
			s, ok := resilientpg.StatsOf(db)
			if !ok {
				t.Fatal("StatsOf: not a resilientpg pool")
			}
			t.Logf("Stats after the kill: Discards %v, Invalidations %v, Gate %+v; all: %+v", s.Discards, s.Invalidations, s.Gate, s)
			checkDiscards(t, s)

			var sum float64
			for i := range s.Discards {
				r := resilientpg.DiscardReason(i)
				v := got[`resilientpg_discards_total{reason="`+r.String()+`"}`]
				sum += v
				if v != float64(s.Discards[r]) {
					t.Errorf("resilientpg_discards_total{reason=%q} = %v, Stats says %d", r, v, s.Discards[r])
				}
			}
			if sum != poolSize {
				t.Errorf("resilientpg_discards_total summed over reasons = %v, want %d", sum, poolSize)
			}
			for i := range s.Invalidations {
				c := resilientpg.InvalidationCause(i)
				if v := got[`resilientpg_invalidations_total{cause="`+c.String()+`"}`]; v != float64(s.Invalidations[c]) {
					t.Errorf("resilientpg_invalidations_total{cause=%q} = %v, Stats says %d", c, v, s.Invalidations[c])
				}
			}
		})
	}
}

// checkDiscards asserts the wrapper's exact account of the kill: the first
// checkout finds every idle session ended at once and retires the pool
// (one invalidation, cause shutdown), so each of the poolSize connections
// is discarded once, as invalidated.
func checkDiscards(t *testing.T, s resilientpg.Stats) {
	t.Helper()
	if s.Discards[resilientpg.DiscardInvalidated] != poolSize || s.Discards.Total() != poolSize {
		t.Errorf("Stats.Discards = %v, want exactly %d, all invalidated", s.Discards, poolSize)
	}
	if s.Invalidations[resilientpg.InvalidShutdown] != 1 || s.Invalidations.Total() != 1 {
		t.Errorf("Stats.Invalidations = %v, want exactly one, cause shutdown", s.Invalidations)
	}
}
