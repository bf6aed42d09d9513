package resilientprom

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/resilientpg/resilientpg"
)

// definition is one row of the metric table: everything but the db_name
// constant label, which each collector adds.
type definition struct {
	name, help string
	label      string // "" for a metric without a variable label
	typ        prometheus.ValueType
	emit       func(s *resilientpg.Stats, add func(v float64, label ...string))
}

// definitions lists the metrics in the order of resilientpg.Stats, which is
// the order of the README's table.
var definitions = []definition{
	counter("resilientpg_conns_opened_total", "Connections made.",
		func(s *resilientpg.Stats) float64 { return float64(s.ConnsOpened) }),
	gauge("resilientpg_conns_open", "Connections made and not yet closed.",
		func(s *resilientpg.Stats) float64 { return float64(s.ConnsOpen) }),
	counter("resilientpg_connect_attempts_total", "Dials of the inner connector, probes included.",
		func(s *resilientpg.Stats) float64 { return float64(s.ConnectAttempts) }),
	perClass("resilientpg_connect_failures_total", "Failed dials, by error class.",
		func(s *resilientpg.Stats) resilientpg.ClassCounts { return s.ConnectFailures }),
	counter("resilientpg_connect_seconds_total", "Time spent in dials, failed ones included.",
		func(s *resilientpg.Stats) float64 { return seconds(s.ConnectTime) }),

	counter("resilientpg_checkouts_total", "Checkouts examined by the wrapper.",
		func(s *resilientpg.Stats) float64 { return float64(s.Checkouts) }),
	perDiscard("resilientpg_discards_total", "Connections discarded at checkout, by reason.",
		func(s *resilientpg.Stats) resilientpg.DiscardCounts { return s.Discards }),
	perDiscard("resilientpg_returns_rejected_total", "Connections refused at return to the pool, by reason.",
		func(s *resilientpg.Stats) resilientpg.DiscardCounts { return s.ReturnsRejected }),

	counter("resilientpg_pings_total", "Checkout pings.",
		func(s *resilientpg.Stats) float64 { return float64(s.Pings) }),
	counter("resilientpg_ping_failures_total", "Checkout pings that failed; their connections were discarded.",
		func(s *resilientpg.Stats) float64 { return float64(s.PingFailures) }),
	counter("resilientpg_ping_seconds_total", "Time spent in checkout pings.",
		func(s *resilientpg.Stats) float64 { return seconds(s.PingTime) }),
	gauge("resilientpg_ping_max_seconds", "The slowest checkout ping so far.",
		func(s *resilientpg.Stats) float64 { return seconds(s.PingTimeMax) }),

	perClass("resilientpg_statement_failures_total", "Failed statements whose error says something about the connection or server, by error class.",
		func(s *resilientpg.Stats) resilientpg.ClassCounts { return s.StatementFailures }),
	perRetry("resilientpg_statement_retries_total", "Failed statements handed back to database/sql to run again, by reason.", true),
	perRetry("resilientpg_statements_not_retried_total", "Failed statements returned to the caller unretried, by reason.", false),
	{
		name: "resilientpg_invalidations_total", help: "Pool-wide invalidations, by cause.",
		label: "cause", typ: prometheus.CounterValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for i, n := range s.Invalidations {
				add(float64(n), resilientpg.InvalidationCause(i).String())
			}
		},
	},

	{
		name: "resilientpg_server_state", help: "What the connect gate believes about the server: 1 for the current state, 0 for the others.",
		label: "state", typ: prometheus.GaugeValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for _, st := range []resilientpg.ServerState{resilientpg.ServerUp, resilientpg.ServerSuspect, resilientpg.ServerDown} {
				v := 0.0
				if s.Gate.State == st {
					v = 1
				}
				add(v, st.String())
			}
		},
	},
	counter("resilientpg_outages_total", "Times the connect gate closed because connects failed.",
		func(s *resilientpg.Stats) float64 { return float64(s.Gate.Outages) }),
	counter("resilientpg_downtime_seconds_total", "Time the connect gate was closed, the current outage included.",
		func(s *resilientpg.Stats) float64 { return seconds(s.Gate.Downtime) }),
	counter("resilientpg_connect_probes_total", "Connects made while the server was suspect or down.",
		func(s *resilientpg.Stats) float64 { return float64(s.Gate.Probes) }),
	counter("resilientpg_connect_waited_total", "Connect calls that waited for another caller's probe.",
		func(s *resilientpg.Stats) float64 { return float64(s.Gate.Waited) }),
	counter("resilientpg_connect_failed_fast_total", "Connect calls failed at once because the server was known to be down.",
		func(s *resilientpg.Stats) float64 { return float64(s.Gate.FailedFast) }),
	counter("resilientpg_connect_held_total", "Connect calls held back after a recovery while other pools of the server had no connection yet.",
		func(s *resilientpg.Stats) float64 { return float64(s.Gate.Held) }),

	gauge("resilientpg_checked_out", "Connections held by callers.",
		func(s *resilientpg.Stats) float64 { return float64(s.CheckedOut) }),
	gauge("resilientpg_oldest_checkout_seconds", "How long the longest-held connection has been checked out.",
		func(s *resilientpg.Stats) float64 { return seconds(s.OldestCheckout) }),
	counter("resilientpg_leaks_suspected_total", "Checkouts held past resilient_leak_threshold.",
		func(s *resilientpg.Stats) float64 { return float64(s.LeaksSuspected) }),
	counter("resilientpg_leaks_returned_total", "Suspected leaks returned since.",
		func(s *resilientpg.Stats) float64 { return float64(s.LeaksReturned) }),
	counter("resilientpg_pool_exhausted_total", "Times every connection was in use for over a second while callers waited, reported at most once a minute while it lasts.",
		func(s *resilientpg.Stats) float64 { return float64(s.PoolExhausted) }),

	counter("resilientpg_tx_attempts_total", "Transaction attempts RunTx began.",
		func(s *resilientpg.Stats) float64 { return float64(s.TxAttempts) }),
	{
		name: "resilientpg_tx_retries_total", help: "Transactions RunTx ran again, by cause.",
		label: "cause", typ: prometheus.CounterValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for i, n := range s.TxRetries {
				add(float64(n), resilientpg.TxRetryCause(i).String())
			}
		},
	},
	counter("resilientpg_tx_commit_unknown_total", "Commits whose connection was lost while COMMIT was in flight (ErrCommitUnknown).",
		func(s *resilientpg.Stats) float64 { return float64(s.TxCommitUnknown) }),
	counter("resilientpg_tx_refused_total", "Statements and Commits the transaction guard refused (ErrTxAborted) without sending them.",
		func(s *resilientpg.Stats) float64 { return float64(s.TxRefused) }),

	counter("resilientpg_reap_orphans_total", "Connections discarded on a dead path, whose server session may live on.",
		func(s *resilientpg.Stats) float64 { return float64(s.Reap.Orphans) }),
	{
		name: "resilientpg_reap_sessions_total", help: "Server sessions of orphaned connections the reaper dealt with, by outcome.",
		label: "outcome", typ: prometheus.CounterValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for o, n := range s.Reap.ByOutcome() {
				add(float64(n), resilientpg.ReapOutcome(o).String())
			}
		},
	},
	gauge("resilientpg_reap_off", "1 if reaping is off for this pool (a permission error, or resilient_reap=off), else 0.",
		func(s *resilientpg.Stats) float64 {
			if s.Reap.Off {
				return 1
			}
			return 0
		}),
}

func seconds(d time.Duration) float64 { return d.Seconds() }

func counter(name, help string, v func(*resilientpg.Stats) float64) definition {
	return scalar(prometheus.CounterValue, name, help, v)
}

func gauge(name, help string, v func(*resilientpg.Stats) float64) definition {
	return scalar(prometheus.GaugeValue, name, help, v)
}

func scalar(typ prometheus.ValueType, name, help string, v func(*resilientpg.Stats) float64) definition {
	return definition{name: name, help: help, typ: typ,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) { add(v(s)) }}
}

// perDiscard labels by every DiscardReason.
func perDiscard(name, help string, counts func(*resilientpg.Stats) resilientpg.DiscardCounts) definition {
	return definition{name: name, help: help, label: "reason", typ: prometheus.CounterValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for i, n := range counts(s) {
				add(float64(n), resilientpg.DiscardReason(i).String())
			}
		}}
}

// perClass labels by every Class but ClassNone, the class of no error,
// which no failure has.
func perClass(name, help string, counts func(*resilientpg.Stats) resilientpg.ClassCounts) definition {
	return definition{name: name, help: help, label: "class", typ: prometheus.CounterValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for i, n := range counts(s) {
				if c := resilientpg.Class(i); c != resilientpg.ClassNone {
					add(float64(n), c.Label())
				}
			}
		}}
}

// perRetry labels by the RetryReasons whose Retried is retried: one name
// for the statements run again, another for those that were not, so that
// neither needs a label filter to be read right.
func perRetry(name, help string, retried bool) definition {
	return definition{name: name, help: help, label: "reason", typ: prometheus.CounterValue,
		emit: func(s *resilientpg.Stats, add func(float64, ...string)) {
			for i, n := range s.Retries {
				if r := resilientpg.RetryReason(i); r.Retried() == retried {
					add(float64(n), r.Label())
				}
			}
		}}
}
