// Package resilientprom exports the counters of a resilientpg pool as
// Prometheus metrics.
//
// Register its collector next to client_golang's own database/sql
// collector, with the same name: the pool's sizes and waits come from
// collectors.NewDBStatsCollector (go_sql_*), what the wrapper decided about
// each connection from NewCollector (resilientpg_*), and both carry the
// constant label db_name, so the two join in a query:
//
//	reg.MustRegister(
//		collectors.NewDBStatsCollector(db, "orders"),
//		resilientprom.NewCollector(db, "orders"),
//	)
//
// Every scrape takes one resilientpg.StatsOf snapshot, so the values of one
// scrape are consistent with each other. A labelled metric reports every
// label value, zero or not, so that rate() and absent() work from the
// first scrape on.
package resilientprom

import (
	"database/sql"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/resilientpg/resilientpg"
)

// NewCollector returns a collector of the resilientpg counters behind db,
// with the constant label db_name=dbName, as collectors.NewDBStatsCollector
// uses.
//
// db should come from sql.Open("resilientpg"|"resilientmysql", ...),
// resilientpg.Open or resilientpg.OpenDB. For any other *sql.DB the
// collector still describes every metric, so it registers the same way, but
// collects none: the wrapper is not there to count anything. Nothing is
// logged, because an exporter cannot tell a mistake from a pool that is
// switched between drivers by configuration; resilientpg.StatsOf reports
// which it is.
func NewCollector(db *sql.DB, dbName string) prometheus.Collector {
	return newCollector(func() (resilientpg.Stats, bool) { return resilientpg.StatsOf(db) }, dbName)
}

// collector emits each metric of its table from one snapshot per Collect.
type collector struct {
	snapshot func() (resilientpg.Stats, bool)
	metrics  []metric
}

// metric is one metric name. Its values come from emit, which calls add
// once per series, with the label value if the metric has a label.
type metric struct {
	desc *prometheus.Desc
	typ  prometheus.ValueType
	emit func(s *resilientpg.Stats, add func(v float64, label ...string))
}

func newCollector(snapshot func() (resilientpg.Stats, bool), dbName string) *collector {
	c := &collector{snapshot: snapshot}
	for _, d := range definitions {
		var labels []string
		if d.label != "" {
			labels = []string{d.label}
		}
		c.metrics = append(c.metrics, metric{
			desc: prometheus.NewDesc(d.name, d.help, labels, prometheus.Labels{"db_name": dbName}),
			typ:  d.typ,
			emit: d.emit,
		})
	}
	return c
}

// Describe sends the description of every metric, whatever db is.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

// Collect sends the metrics of one snapshot, or nothing if db is not a
// resilientpg pool.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s, ok := c.snapshot()
	if !ok {
		return
	}
	for _, m := range c.metrics {
		m.emit(&s, func(v float64, label ...string) {
			ch <- prometheus.MustNewConstMetric(m.desc, m.typ, v, label...)
		})
	}
}
