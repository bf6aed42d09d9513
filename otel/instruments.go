package resilientotel

import (
	"errors"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/resilientpg/resilientpg"
)

type stats = resilientpg.Stats

// builder creates the resilientpg.* instruments and, for each, the function
// that observes it from a snapshot. Attribute sets are built once here, so
// a collection allocates none.
type builder struct {
	m       metric.Meter
	pool    attribute.KeyValue
	insts   []metric.Observable
	observe []func(metric.Observer, *stats)
	err     error
}

// define lists the instruments in the order of resilientpg.Stats, as the
// Prometheus exporter does, under OpenTelemetry names and units.
func (b *builder) define() {
	b.counter("resilientpg.connections.opened", "{connection}", "Connections made.",
		func(s *stats) int64 { return s.ConnsOpened })
	b.upDown("resilientpg.connections.open", "{connection}", "Connections made and not yet closed.",
		func(s *stats) int64 { return s.ConnsOpen })
	b.counter("resilientpg.connect.attempts", "{attempt}", "Dials of the inner connector, probes included.",
		func(s *stats) int64 { return s.ConnectAttempts })
	b.counterBy("resilientpg.connect.failures", "{attempt}", "Failed dials, by error class.",
		semconv.ErrorTypeKey, classLabels(), func(s *stats) []int64 { return s.ConnectFailures[:] })
	b.seconds("resilientpg.connect.duration", "Time spent in dials, failed ones included.",
		func(s *stats) time.Duration { return s.ConnectTime })

	b.counter("resilientpg.checkouts", "{checkout}", "Checkouts examined by the wrapper.",
		func(s *stats) int64 { return s.Checkouts })
	b.counterBy("resilientpg.discards", "{connection}", "Connections discarded at checkout, by reason.",
		"reason", discardLabels(), func(s *stats) []int64 { return s.Discards[:] })
	b.counterBy("resilientpg.returns.rejected", "{connection}", "Connections refused at return to the pool, by reason.",
		"reason", discardLabels(), func(s *stats) []int64 { return s.ReturnsRejected[:] })

	b.counter("resilientpg.pings", "{ping}", "Checkout pings.",
		func(s *stats) int64 { return s.Pings })
	b.counter("resilientpg.ping.failures", "{ping}", "Checkout pings that failed; their connections were discarded.",
		func(s *stats) int64 { return s.PingFailures })
	b.seconds("resilientpg.ping.duration", "Time spent in checkout pings.",
		func(s *stats) time.Duration { return s.PingTime })
	b.gaugeSeconds("resilientpg.ping.duration.max", "The slowest checkout ping so far.",
		func(s *stats) time.Duration { return s.PingTimeMax })

	b.counterBy("resilientpg.statement.failures", "{statement}", "Failed statements whose error says something about the connection or server, by error class.",
		semconv.ErrorTypeKey, classLabels(), func(s *stats) []int64 { return s.StatementFailures[:] })
	b.counterBy("resilientpg.statement.retries", "{statement}", "Failed statements handed back to database/sql to run again, by reason.",
		"reason", retryLabels(true), func(s *stats) []int64 { return s.Retries[:] })
	b.counterBy("resilientpg.statement.not_retried", "{statement}", "Failed statements returned to the caller unretried, by reason.",
		"reason", retryLabels(false), func(s *stats) []int64 { return s.Retries[:] })
	b.counterBy("resilientpg.invalidations", "{invalidation}", "Pool-wide invalidations, by cause.",
		"cause", causeLabels(), func(s *stats) []int64 { return s.Invalidations[:] })

	b.serverState()
	b.counter("resilientpg.outages", "{outage}", "Times the connect gate closed because connects failed.",
		func(s *stats) int64 { return s.Gate.Outages })
	b.seconds("resilientpg.downtime", "Time the connect gate was closed, the current outage included.",
		func(s *stats) time.Duration { return s.Gate.Downtime })
	b.counter("resilientpg.connect.probes", "{attempt}", "Connects made while the server was suspect or down.",
		func(s *stats) int64 { return s.Gate.Probes })
	b.counter("resilientpg.connect.waited", "{call}", "Connect calls that waited for another caller's probe.",
		func(s *stats) int64 { return s.Gate.Waited })
	b.counter("resilientpg.connect.failed_fast", "{call}", "Connect calls failed at once because the server was known to be down.",
		func(s *stats) int64 { return s.Gate.FailedFast })
	b.counter("resilientpg.connect.held", "{call}", "Connect calls held back after a recovery while other pools of the server had no connection yet.",
		func(s *stats) int64 { return s.Gate.Held })

	b.upDown("resilientpg.checked_out", "{connection}", "Connections held by callers.",
		func(s *stats) int64 { return s.CheckedOut })
	b.gaugeSeconds("resilientpg.checkout.oldest", "How long the longest-held connection has been checked out.",
		func(s *stats) time.Duration { return s.OldestCheckout })
	b.counter("resilientpg.leaks.suspected", "{checkout}", "Checkouts held past resilient_leak_threshold.",
		func(s *stats) int64 { return s.LeaksSuspected })
	b.counter("resilientpg.leaks.returned", "{checkout}", "Suspected leaks returned since.",
		func(s *stats) int64 { return s.LeaksReturned })
	b.counter("resilientpg.pool.exhausted", "{report}", "Times every connection was in use for over a second while callers waited, reported at most once a minute while it lasts.",
		func(s *stats) int64 { return s.PoolExhausted })

	b.counter("resilientpg.tx.attempts", "{transaction}", "Transaction attempts RunTx began.",
		func(s *stats) int64 { return s.TxAttempts })
	b.counterBy("resilientpg.tx.retries", "{transaction}", "Transactions RunTx ran again, by cause.",
		"cause", txCauseLabels(), func(s *stats) []int64 { return s.TxRetries[:] })
	b.counter("resilientpg.tx.commit_unknown", "{transaction}", "Commits whose connection was lost while COMMIT was in flight (ErrCommitUnknown).",
		func(s *stats) int64 { return s.TxCommitUnknown })
	b.counter("resilientpg.tx.refused", "{statement}", "Statements and Commits the transaction guard refused (ErrTxAborted) without sending them.",
		func(s *stats) int64 { return s.TxRefused })

	b.counter("resilientpg.reap.orphans", "{connection}", "Connections discarded on a dead path, whose server session may live on.",
		func(s *stats) int64 { return s.Reap.Orphans })
	b.reapSessions()
	b.upDown("resilientpg.reap.off", "1", "1 if reaping is off for this pool (a permission error, or resilient_reap=off), else 0.",
		func(s *stats) int64 {
			if s.Reap.Off {
				return 1
			}
			return 0
		})
}

// add keeps the instrument for the callback, or the first error.
func (b *builder) add(inst metric.Observable, err error, f func(metric.Observer, *stats)) {
	b.err = errors.Join(b.err, err)
	b.insts = append(b.insts, inst)
	b.observe = append(b.observe, f)
}

func (b *builder) counter(name, unit, desc string, v func(*stats) int64) {
	inst, err := b.m.Int64ObservableCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
	opt := metric.WithAttributeSet(attribute.NewSet(b.pool))
	b.add(inst, err, func(o metric.Observer, s *stats) { o.ObserveInt64(inst, v(s), opt) })
}

func (b *builder) upDown(name, unit, desc string, v func(*stats) int64) {
	inst, err := b.m.Int64ObservableUpDownCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
	opt := metric.WithAttributeSet(attribute.NewSet(b.pool))
	b.add(inst, err, func(o metric.Observer, s *stats) { o.ObserveInt64(inst, v(s), opt) })
}

// seconds is a total time, a counter in seconds.
func (b *builder) seconds(name, desc string, v func(*stats) time.Duration) {
	inst, err := b.m.Float64ObservableCounter(name, metric.WithUnit("s"), metric.WithDescription(desc))
	opt := metric.WithAttributeSet(attribute.NewSet(b.pool))
	b.add(inst, err, func(o metric.Observer, s *stats) { o.ObserveFloat64(inst, v(s).Seconds(), opt) })
}

func (b *builder) gaugeSeconds(name, desc string, v func(*stats) time.Duration) {
	inst, err := b.m.Float64ObservableGauge(name, metric.WithUnit("s"), metric.WithDescription(desc))
	opt := metric.WithAttributeSet(attribute.NewSet(b.pool))
	b.add(inst, err, func(o metric.Observer, s *stats) { o.ObserveFloat64(inst, v(s).Seconds(), opt) })
}

// counterBy observes counts[i] with key=labels[i], skipping the indexes
// whose label is "": every other label value is reported, zero or not.
func (b *builder) counterBy(name, unit, desc string, key attribute.Key, labels []string, counts func(*stats) []int64) {
	inst, err := b.m.Int64ObservableCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
	opts := make([]metric.ObserveOption, len(labels))
	for i, l := range labels {
		if l != "" {
			opts[i] = metric.WithAttributeSet(attribute.NewSet(b.pool, key.String(l)))
		}
	}
	b.add(inst, err, func(o metric.Observer, s *stats) {
		for i, n := range counts(s) {
			if opts[i] != nil {
				o.ObserveInt64(inst, n, opts[i])
			}
		}
	})
}

// serverState reports 1 for the gate's current state and 0 for the others,
// as an up-down counter (the hw.status pattern), so the states sum to 1.
func (b *builder) serverState() {
	inst, err := b.m.Int64ObservableUpDownCounter("resilientpg.server.state", metric.WithUnit("1"),
		metric.WithDescription("What the connect gate believes about the server: 1 for the current state, 0 for the others."))
	states := []resilientpg.ServerState{resilientpg.ServerUp, resilientpg.ServerSuspect, resilientpg.ServerDown}
	opts := make([]metric.ObserveOption, len(states))
	for i, st := range states {
		opts[i] = metric.WithAttributeSet(attribute.NewSet(b.pool, attribute.String("state", st.String())))
	}
	b.add(inst, err, func(o metric.Observer, s *stats) {
		for i, st := range states {
			var v int64
			if s.Gate.State == st {
				v = 1
			}
			o.ObserveInt64(inst, v, opts[i])
		}
	})
}

// reapSessions observes each reap outcome with outcome=its label. The
// counts come as an array value (ReapStats.ByOutcome), which counterBy's
// slice would make escape at every collection.
func (b *builder) reapSessions() {
	inst, err := b.m.Int64ObservableCounter("resilientpg.reap.sessions", metric.WithUnit("{session}"),
		metric.WithDescription("Server sessions of orphaned connections the reaper dealt with, by outcome."))
	var opts [len(resilientpg.ReapOutcomeCounts{})]metric.ObserveOption
	for i := range opts {
		opts[i] = metric.WithAttributeSet(attribute.NewSet(b.pool, attribute.String("outcome", resilientpg.ReapOutcome(i).String())))
	}
	b.add(inst, err, func(o metric.Observer, s *stats) {
		for i, n := range s.Reap.ByOutcome() {
			o.ObserveInt64(inst, n, opts[i])
		}
	})
}

func discardLabels() []string {
	var l []string
	for i := range (resilientpg.DiscardCounts{}) {
		l = append(l, resilientpg.DiscardReason(i).String())
	}
	return l
}

// classLabels leaves out ClassNone, the class of no error, which no
// failure has.
func classLabels() []string {
	var l []string
	for i := range (resilientpg.ClassCounts{}) {
		if c := resilientpg.Class(i); c != resilientpg.ClassNone {
			l = append(l, c.Label())
		} else {
			l = append(l, "")
		}
	}
	return l
}

// retryLabels labels the reasons whose Retried is retried and blanks the
// others, which the other instrument reports.
func retryLabels(retried bool) []string {
	var l []string
	for i := range (resilientpg.RetryCounts{}) {
		if r := resilientpg.RetryReason(i); r.Retried() == retried {
			l = append(l, r.Label())
		} else {
			l = append(l, "")
		}
	}
	return l
}

func txCauseLabels() []string {
	var l []string
	for i := range (resilientpg.TxRetryCounts{}) {
		l = append(l, resilientpg.TxRetryCause(i).String())
	}
	return l
}

func causeLabels() []string {
	var l []string
	for i := range (resilientpg.InvalidationCounts{}) {
		l = append(l, resilientpg.InvalidationCause(i).String())
	}
	return l
}
