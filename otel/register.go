// Package resilientotel reports a resilientpg pool through the
// OpenTelemetry metric API: the semantic-convention connection-pool
// metrics that a driver can observe, and the wrapper's own counters as
// resilientpg.* instruments.
//
//	reg, err := resilientotel.Register(db, "orders", nil) // nil: otel.GetMeterProvider()
//	...
//	defer reg.Unregister()
//
// Every instrument is observable and read by one callback, which takes one
// db.Stats() and one resilientpg.StatsOf snapshot per collection: nothing
// is added to the path of a query, and the values of one collection agree
// with each other. Every data point carries db.client.connection.pool.name.
//
// # Semantic-convention metrics
//
//   - db.client.connection.count {connection}, with db.client.connection.state
//     idle or used: db.Stats().Idle and InUse;
//   - db.client.connection.max {connection}: db.Stats().MaxOpenConnections,
//     reported only when a limit is set (0 means unlimited, not zero).
//
// # Left out, and why
//
// A driver sits below database/sql's pool and sees only what DBStats says,
// so these conventions are not reported, rather than reported wrong:
//
//   - db.client.connection.pending_requests and db.client.connection.timeouts:
//     waiting for a connection happens inside database/sql, which never calls
//     the driver while a caller waits. DBStats has only WaitCount, the waits
//     started, and WaitDuration, the time of the waits that have ended; the
//     number waiting now and the waits that gave up cannot be derived from
//     them.
//   - db.client.connection.wait_time, .create_time and .use_time: they are
//     histograms of single events. The wait is invisible, as above; the
//     create and use times would need a clock read and a histogram record on
//     every connect and checkout, on the hot path, which this package keeps
//     free. The totals resilientpg.connect.duration and the checkout gauges
//     cover the same questions at no per-query cost.
//   - db.client.connection.idle.max and .idle.min: database/sql does not
//     expose SetMaxIdleConns's value, and has no minimum.
package resilientotel

import (
	"context"
	"database/sql"
	"errors"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/semconv/v1.43.0/dbconv"

	"github.com/resilientpg/resilientpg"
)

// ScopeName is the instrumentation scope of the meter Register uses.
const ScopeName = "github.com/resilientpg/resilientpg/otel"

// Register creates the instruments on mp's meter for this package and
// registers one callback that observes db. poolName becomes the
// db.client.connection.pool.name of every data point; it should be unique
// within the process. A nil mp means otel.GetMeterProvider().
//
// db should come from sql.Open("resilientpg"|"resilientmysql", ...),
// resilientpg.Open or resilientpg.OpenDB. For any other *sql.DB the
// db.client.connection.* metrics are still reported, since they come from
// db.Stats(), and the resilientpg.* instruments observe nothing.
//
// Unregister the returned Registration when db is closed. Register fails
// if db is nil, or if an instrument or the callback cannot be created, and
// then registers no callback.
func Register(db *sql.DB, poolName string, mp metric.MeterProvider) (metric.Registration, error) {
	return register(db, poolName, mp, func() (resilientpg.Stats, bool) { return resilientpg.StatsOf(db) })
}

func register(db *sql.DB, poolName string, mp metric.MeterProvider, snapshot func() (resilientpg.Stats, bool)) (metric.Registration, error) {
	if db == nil {
		return nil, errors.New("resilientotel: Register: nil *sql.DB")
	}
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(ScopeName, metric.WithSchemaURL(semconv.SchemaURL))
	pool := semconv.DBClientConnectionPoolNameKey.String(poolName)

	count, err := dbconv.NewClientConnectionCountObservable(m)
	if err != nil {
		return nil, err
	}
	maxConns, err := dbconv.NewClientConnectionMaxObservable(m)
	if err != nil {
		return nil, err
	}
	idle := metric.WithAttributeSet(attribute.NewSet(pool, semconv.DBClientConnectionStateIdle))
	used := metric.WithAttributeSet(attribute.NewSet(pool, semconv.DBClientConnectionStateUsed))
	poolOnly := metric.WithAttributeSet(attribute.NewSet(pool))

	b := &builder{m: m, pool: pool, insts: []metric.Observable{count.Inst(), maxConns.Inst()}}
	b.define()
	if b.err != nil {
		return nil, b.err
	}
	observe := b.observe
	return m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := db.Stats()
		o.ObserveInt64(count.Inst(), int64(st.Idle), idle)
		o.ObserveInt64(count.Inst(), int64(st.InUse), used)
		if st.MaxOpenConnections > 0 {
			o.ObserveInt64(maxConns.Inst(), int64(st.MaxOpenConnections), poolOnly)
		}
		if s, ok := snapshot(); ok {
			for _, f := range observe {
				f(o, &s)
			}
		}
		return nil
	}, b.insts...)
}
