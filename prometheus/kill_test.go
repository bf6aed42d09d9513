package resilientprom_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientprom "github.com/resilientpg/resilientpg/prometheus"
)

// TestFaultsReachTheCollector runs every shared real-server fault of
// internal/killtest on both engines (every pooled session killed, a server
// restart under an idle pool, every pooled connection black-holed) and
// reads the wrapper's exact account of each back through the collector:
// the same counts as Stats, and the counts the fault defines.
func TestFaultsReachTheCollector(t *testing.T) {
	for _, e := range killtest.Engines {
		t.Run(e.Name, func(t *testing.T) {
			for _, f := range killtest.Faults {
				t.Run(f.Name, func(t *testing.T) {
					db := f.Run(t, e)
					reg := prometheus.NewPedanticRegistry()
					reg.MustRegister(resilientprom.NewCollector(db, e.Name))
					got := gather(t, reg, e.Name)
					s, ok := resilientpg.StatsOf(db)
					if !ok {
						t.Fatal("StatsOf: not a resilientpg pool")
					}
					t.Logf("Stats after the fault: Discards %v, Invalidations %v, pings %d (%d failed), Gate %+v",
						s.Discards, s.Invalidations, s.Pings, s.PingFailures, s.Gate)
					f.Check(t, s)
					f.CheckExported(t, "prometheus", func(series, label string) (float64, bool) {
						key := map[string]string{
							killtest.SeriesDiscards:      `resilientpg_discards_total{reason="` + label + `"}`,
							killtest.SeriesInvalidations: `resilientpg_invalidations_total{cause="` + label + `"}`,
							killtest.SeriesPings:         "resilientpg_pings_total",
							killtest.SeriesPingFailures:  "resilientpg_ping_failures_total",
						}[series]
						v, ok := got[key]
						return v, ok
					})

					// Every series agrees with the snapshot it was read from.
					for i := range s.Discards {
						r := resilientpg.DiscardReason(i)
						if v := got[`resilientpg_discards_total{reason="`+r.String()+`"}`]; v != float64(s.Discards[r]) {
							t.Errorf("resilientpg_discards_total{reason=%q} = %v, Stats says %d", r, v, s.Discards[r])
						}
					}
					for i := range s.Invalidations {
						c := resilientpg.InvalidationCause(i)
						if v := got[`resilientpg_invalidations_total{cause="`+c.String()+`"}`]; v != float64(s.Invalidations[c]) {
							t.Errorf("resilientpg_invalidations_total{cause=%q} = %v, Stats says %d", c, v, s.Invalidations[c])
						}
					}
				})
			}
		})
	}
}
