package resilientotel

import (
	"database/sql"

	"go.opentelemetry.io/otel/metric"

	"github.com/resilientpg/resilientpg"
)

// RegisterFrom is Register with the resilientpg.* instruments read from a
// given snapshot source, so that a test can feed them any Stats.
func RegisterFrom(db *sql.DB, poolName string, mp metric.MeterProvider, snapshot func() (resilientpg.Stats, bool)) (metric.Registration, error) {
	return register(db, poolName, mp, snapshot)
}
