package resilientprom_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientprom "github.com/resilientpg/resilientpg/prometheus"
)

// TestKilledSessionsReachTheCollector kills every session of a full pool
// on a real server and reads the ten discards back through the collector.
// The counts are exact (see checkDiscards), read back both ways.
func TestKilledSessionsReachTheCollector(t *testing.T) {
	for _, e := range []struct {
		name   string
		target func(*testing.T) killtest.Target
	}{
		{"postgres", killtest.Postgres},
		{"mariadb", killtest.MariaDB},
	} {
		t.Run(e.name, func(t *testing.T) {
			db := killtest.Scenario(t, e.target(t))
			reg := prometheus.NewPedanticRegistry()
			reg.MustRegister(resilientprom.NewCollector(db, e.name))
			got := gather(t, reg, e.name)
			s, ok := resilientpg.StatsOf(db)
			if !ok {
				t.Fatal("StatsOf: not a resilientpg pool")
			}
			t.Logf("Stats after the kill: Discards %v, Invalidations %v, Gate %+v; all: %+v", s.Discards, s.Invalidations, s.Gate, s)
			killtest.CheckDiscards(t, s)

			var sum float64
			for i := range s.Discards {
				r := resilientpg.DiscardReason(i)
				v := got[`resilientpg_discards_total{reason="`+r.String()+`"}`]
				sum += v
				if v != float64(s.Discards[r]) {
					t.Errorf("resilientpg_discards_total{reason=%q} = %v, Stats says %d", r, v, s.Discards[r])
				}
			}
			if sum != killtest.PoolSize {
				t.Errorf("resilientpg_discards_total summed over reasons = %v, want %d", sum, killtest.PoolSize)
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
