package resilientotel_test

import (
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientotel "github.com/resilientpg/resilientpg/otel"
)

// TestFaultsReachTheReader runs every shared real-server fault of
// internal/killtest on both engines (every pooled session killed, a server
// restart under an idle pool, every pooled connection black-holed) and
// reads the wrapper's exact account of each back through a ManualReader:
// the same counts as Stats, and the counts the fault defines.
func TestFaultsReachTheReader(t *testing.T) {
	for _, e := range killtest.Engines {
		t.Run(e.Name, func(t *testing.T) {
			for _, f := range killtest.Faults {
				t.Run(f.Name, func(t *testing.T) {
					db := f.Run(t, e)
					reader := sdkmetric.NewManualReader()
					if _, err := resilientotel.Register(db, e.Name, sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))); err != nil {
						t.Fatal(err)
					}
					got := collect(t, reader, e.Name)
					s, ok := resilientpg.StatsOf(db)
					if !ok {
						t.Fatal("StatsOf: not a resilientpg pool")
					}
					t.Logf("Stats after the fault: Discards %v, Invalidations %v, pings %d (%d failed), Gate %+v",
						s.Discards, s.Invalidations, s.Pings, s.PingFailures, s.Gate)
					f.Check(t, s)
					f.CheckExported(t, "otel", func(series, label string) (float64, bool) {
						key := map[string]string{
							killtest.SeriesDiscards:      "resilientpg.discards{reason=" + label + "}",
							killtest.SeriesInvalidations: "resilientpg.invalidations{cause=" + label + "}",
							killtest.SeriesPings:         "resilientpg.pings",
							killtest.SeriesPingFailures:  "resilientpg.ping.failures",
						}[series]
						v, ok := got[key]
						return v, ok
					})

					// Every series agrees with the snapshot it was read from.
					for i := range s.Discards {
						r := resilientpg.DiscardReason(i)
						if v := got["resilientpg.discards{reason="+r.String()+"}"]; v != float64(s.Discards[r]) {
							t.Errorf("resilientpg.discards{reason=%s} = %v, Stats says %d", r, v, s.Discards[r])
						}
					}
					for i := range s.Invalidations {
						c := resilientpg.InvalidationCause(i)
						if v := got["resilientpg.invalidations{cause="+c.String()+"}"]; v != float64(s.Invalidations[c]) {
							t.Errorf("resilientpg.invalidations{cause=%s} = %v, Stats says %d", c, v, s.Invalidations[c])
						}
					}
					if idle := got["db.client.connection.count{db.client.connection.state=idle}"]; idle != killtest.PoolSize {
						t.Errorf("idle connections after the burst = %v, want %d", idle, killtest.PoolSize)
					}
				})
			}
		})
	}
}
