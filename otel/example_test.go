package resilientotel_test

import (
	"context"
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientotel "github.com/resilientpg/resilientpg/otel"
)

// Register a pool with a MeterProvider; nil means the global one, as set
// by otel.SetMeterProvider. Here a ManualReader stands in for an exporter.
func Example() {
	// In a service: db, err := resilientpg.Open("resilientpg", dsn).
	// Here an in-memory driver stands in for the database.
	db, err := resilientpg.OpenDB(&killtest.FakeConnector{}, resilientpg.DefaultOptions())
	if err != nil {
		panic(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(10)

	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	reg, err := resilientotel.Register(db, "orders", mp)
	if err != nil {
		panic(err)
	}
	defer reg.Unregister()

	var one int
	if err := db.QueryRow("SELECT 1").Scan(&one); err != nil {
		panic(err)
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		panic(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		switch m.Name {
		case "db.client.connection.count", "db.client.connection.max", "resilientpg.connections.opened":
			for _, p := range m.Data.(metricdata.Sum[int64]).DataPoints {
				fmt.Printf("%s{%s} %d %s\n", m.Name, p.Attributes.Encoded(attribute.DefaultEncoder()), p.Value, m.Unit)
			}
		}
	}
	fmt.Println(len(rm.ScopeMetrics[0].Metrics), "instruments")
	// Unordered output:
	// db.client.connection.count{db.client.connection.pool.name=orders,db.client.connection.state=idle} 1 {connection}
	// db.client.connection.count{db.client.connection.pool.name=orders,db.client.connection.state=used} 0 {connection}
	// db.client.connection.max{db.client.connection.pool.name=orders} 10 {connection}
	// resilientpg.connections.opened{db.client.connection.pool.name=orders} 1 {connection}
	// 37 instruments
}
