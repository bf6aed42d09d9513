package resilientotel_test

import (
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientotel "github.com/resilientpg/resilientpg/otel"
)

// TestKilledSessionsReachTheReader kills every session of a full pool on a
// real server and reads the ten discards back through a ManualReader.
// The counts are exact (see checkDiscards), read back both ways.
func TestKilledSessionsReachTheReader(t *testing.T) {
	for _, e := range []struct {
		name   string
		target func(*testing.T) killtest.Target
	}{
		{"postgres", killtest.Postgres},
		{"mariadb", killtest.MariaDB},
	} {
		t.Run(e.name, func(t *testing.T) {
			db := killtest.Scenario(t, e.target(t))
			reader := sdkmetric.NewManualReader()
			if _, err := resilientotel.Register(db, e.name, sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))); err != nil {
				t.Fatal(err)
			}
			got := collect(t, reader, e.name)
			s, ok := resilientpg.StatsOf(db)
			if !ok {
				t.Fatal("StatsOf: not a resilientpg pool")
			}
			t.Logf("Stats after the kill: Discards %v, Invalidations %v, Gate %+v; all: %+v", s.Discards, s.Invalidations, s.Gate, s)
			killtest.CheckDiscards(t, s)

			var sum float64
			for i := range s.Discards {
				r := resilientpg.DiscardReason(i)
				v := got["resilientpg.discards{reason="+r.String()+"}"]
				sum += v
				if v != float64(s.Discards[r]) {
					t.Errorf("resilientpg.discards{reason=%s} = %v, Stats says %d", r, v, s.Discards[r])
				}
			}
			if sum != killtest.PoolSize {
				t.Errorf("resilientpg.discards summed over reasons = %v, want %d", sum, killtest.PoolSize)
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
}
