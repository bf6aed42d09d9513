package resilientprom_test

import (
	"fmt"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/common/expfmt"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientprom "github.com/resilientpg/resilientpg/prometheus"
)

// Register the wrapper's collector next to client_golang's database/sql
// collector under the same name, then serve the registry, e.g. with
// promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).
func Example() {
	// In a service: db, err := resilientpg.Open("resilientpg", dsn).
	// Here an in-memory driver stands in for the database.
	db, err := resilientpg.OpenDB(&killtest.FakeConnector{}, resilientpg.DefaultOptions())
	if err != nil {
		panic(err)
	}
	defer db.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewDBStatsCollector(db, "orders"),
		resilientprom.NewCollector(db, "orders"),
	)

	var one int
	if err := db.QueryRow("SELECT 1").Scan(&one); err != nil {
		panic(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		panic(err)
	}
	for _, mf := range mfs {
		switch mf.GetName() {
		case "go_sql_open_connections", "resilientpg_conns_opened_total", "resilientpg_server_state":
			if _, err := expfmt.MetricFamilyToText(os.Stdout, mf); err != nil {
				panic(err)
			}
		}
	}
	n := 0
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "resilientpg_") {
			n++
		}
	}
	fmt.Println(n, "resilientpg metrics")
	// Output:
	// # HELP go_sql_open_connections The number of established connections both in use and idle.
	// # TYPE go_sql_open_connections gauge
	// go_sql_open_connections{db_name="orders"} 1
	// # HELP resilientpg_conns_opened_total Connections made.
	// # TYPE resilientpg_conns_opened_total counter
	// resilientpg_conns_opened_total{db_name="orders"} 1
	// # HELP resilientpg_server_state What the connect gate believes about the server: 1 for the current state, 0 for the others.
	// # TYPE resilientpg_server_state gauge
	// resilientpg_server_state{db_name="orders",state="down"} 0
	// resilientpg_server_state{db_name="orders",state="suspect"} 0
	// resilientpg_server_state{db_name="orders",state="up"} 1
	// 35 resilientpg metrics
}
