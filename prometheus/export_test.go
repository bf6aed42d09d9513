package resilientprom

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/resilientpg/resilientpg"
)

// NewCollectorFrom is NewCollector over a given snapshot source, so that a
// test can feed it any Stats.
func NewCollectorFrom(snapshot func() (resilientpg.Stats, bool), dbName string) prometheus.Collector {
	return newCollector(snapshot, dbName)
}
