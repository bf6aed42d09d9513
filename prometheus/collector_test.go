package resilientprom_test

import (
	"database/sql"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientprom "github.com/resilientpg/resilientpg/prometheus"
)

// gauges are the metric families that are not counters.
var gauges = []string{"resilientpg_conns_open", "resilientpg_ping_max_seconds", "resilientpg_server_state",
	"resilientpg_checked_out", "resilientpg_oldest_checkout_seconds", "resilientpg_reap_off"}

const numFamilies = 35

// synthetic is killtest.Synthetic with values of their own in Reap too.
func TestCollectorMapsEveryField(t *testing.T) {
	c := resilientprom.NewCollectorFrom(func() (resilientpg.Stats, bool) { return killtest.Synthetic(), true }, "orders")
	want := map[string]float64{
		"resilientpg_conns_opened_total": 101, "resilientpg_conns_open": 102,
		"resilientpg_connect_attempts_total": 103, "resilientpg_connect_seconds_total": 1.5,
		"resilientpg_checkouts_total": 104, "resilientpg_pings_total": 105, "resilientpg_ping_failures_total": 106,
		"resilientpg_ping_seconds_total": 2.5, "resilientpg_ping_max_seconds": 0.25,
		`resilientpg_server_state{state="up"}`: 0, `resilientpg_server_state{state="suspect"}`: 1,
		`resilientpg_server_state{state="down"}`: 0, "resilientpg_outages_total": 107,
		"resilientpg_downtime_seconds_total": 3, "resilientpg_connect_probes_total": 108,
		"resilientpg_connect_waited_total": 109, "resilientpg_connect_failed_fast_total": 110, "resilientpg_connect_held_total": 123,
		"resilientpg_checked_out": 111, "resilientpg_oldest_checkout_seconds": 4,
		"resilientpg_leaks_suspected_total": 112, "resilientpg_leaks_returned_total": 113,
		"resilientpg_pool_exhausted_total": 114,
		"resilientpg_tx_attempts_total":    115, "resilientpg_tx_commit_unknown_total": 116, "resilientpg_tx_refused_total": 117,
		"resilientpg_reap_orphans_total": 118, `resilientpg_reap_sessions_total{outcome="reaped"}`: 119,
		`resilientpg_reap_sessions_total{outcome="not_ours"}`: 120, `resilientpg_reap_sessions_total{outcome="gone"}`: 121,
		`resilientpg_reap_sessions_total{outcome="failed"}`: 122, "resilientpg_reap_off": 1,
	}
	for i, l := range killtest.TxCauseLabels {
		want[`resilientpg_tx_retries_total{cause="`+l+`"}`] = float64(800 + i)
	}
	for i, l := range killtest.ClassLabels {
		want[`resilientpg_connect_failures_total{class="`+l+`"}`] = float64(201 + i)
		want[`resilientpg_statement_failures_total{class="`+l+`"}`] = float64(501 + i)
	}
	for i, l := range killtest.DiscardLabels {
		want[`resilientpg_discards_total{reason="`+l+`"}`] = float64(300 + i)
		want[`resilientpg_returns_rejected_total{reason="`+l+`"}`] = float64(400 + i)
	}
	for i, l := range killtest.NotRetriedLabels {
		want[`resilientpg_statements_not_retried_total{reason="`+l+`"}`] = float64(600 + i)
	}
	for i, l := range killtest.RetriedLabels {
		want[`resilientpg_statement_retries_total{reason="`+l+`"}`] = float64(600 + len(killtest.NotRetriedLabels) + i)
	}
	for i, l := range killtest.CauseLabels {
		want[`resilientpg_invalidations_total{cause="`+l+`"}`] = float64(700 + i)
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	got := gather(t, reg, "orders")
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if g, ok := got[k]; !ok || g != want[k] {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, want[k])
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected series %s", k)
		}
	}
	if n := testutil.CollectAndCount(c); n != len(want) {
		t.Errorf("collected %d series, want %d", n, len(want))
	}
}

// TestCollectorReap: the reaper's account, alone in an otherwise zero
// Stats, reaches its own series with the outcome label, and reap_off
// follows Off both ways.
func TestCollectorReap(t *testing.T) {
	for _, off := range []bool{false, true} {
		s := resilientpg.Stats{Reap: resilientpg.ReapStats{Orphans: 9, Reaped: 4, NotOurs: 2, Gone: 1, Failed: 1, Off: off}}
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(resilientprom.NewCollectorFrom(func() (resilientpg.Stats, bool) { return s, true }, "orders"))
		got := gather(t, reg, "orders")
		wantOff := 0.0
		if off {
			wantOff = 1
		}
		for k, v := range map[string]float64{
			"resilientpg_reap_orphans_total":                      9,
			`resilientpg_reap_sessions_total{outcome="reaped"}`:   4,
			`resilientpg_reap_sessions_total{outcome="not_ours"}`: 2,
			`resilientpg_reap_sessions_total{outcome="gone"}`:     1,
			`resilientpg_reap_sessions_total{outcome="failed"}`:   1,
			"resilientpg_reap_off":                                wantOff,
		} {
			if g, ok := got[k]; !ok || g != v {
				t.Errorf("Off %v: %s = %v (present %v), want %v", off, k, g, ok, v)
			}
		}
		n := 0
		for k := range got {
			if strings.HasPrefix(k, "resilientpg_reap_sessions_total") {
				n++
			}
		}
		if n != 4 {
			t.Errorf("Off %v: %d resilientpg_reap_sessions_total series, want 4", off, n)
		}
	}
}

// TestCollectorBesideDBStats registers the collector of a real wrapper
// next to client_golang's database/sql collector in a pedantic registry,
// which checks that what is collected matches what is described.
func TestCollectorBesideDBStats(t *testing.T) {
	fc := &killtest.FakeConnector{}
	db, err := resilientpg.OpenDB(fc, resilientpg.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	query(t, db)
	fc.FailNextReset() // the next checkout refuses it
	query(t, db)

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(collectors.NewDBStatsCollector(db, "orders"), resilientprom.NewCollector(db, "orders"))
	got := gather(t, reg, "orders")
	s, _ := resilientpg.StatsOf(db)
	t.Logf("stats: %+v", s)

	if got["go_sql_open_connections"] != 1 {
		t.Errorf("go_sql_open_connections = %v, want 1: the DBStats collector did not join", got["go_sql_open_connections"])
	}
	for k, v := range map[string]float64{
		`resilientpg_discards_total{reason="driver_reset"}`: 1,
		"resilientpg_conns_opened_total":                    2,
		"resilientpg_conns_open":                            1,
		"resilientpg_connect_attempts_total":                2,
		`resilientpg_server_state{state="up"}`:              1,
	} {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	var discards float64
	for _, l := range killtest.DiscardLabels {
		discards += got[`resilientpg_discards_total{reason="`+l+`"}`]
	}
	if discards != 1 || s.Discards.Total() != 1 {
		t.Errorf("discards: metric sum %v, Stats %d, want 1", discards, s.Discards.Total())
	}
}

func TestCollectorOfPlainDB(t *testing.T) {
	db := sql.OpenDB(&killtest.FakeConnector{})
	defer db.Close()
	query(t, db)
	c := resilientprom.NewCollector(db, "plain")
	if n := testutil.CollectAndCount(c); n != 0 {
		t.Errorf("a plain *sql.DB gave %d series, want 0", n)
	}
	descs := make(chan *prometheus.Desc, 100)
	c.Describe(descs)
	close(descs)
	if len(descs) != numFamilies {
		t.Errorf("described %d metrics, want %d", len(descs), numFamilies)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(collectors.NewDBStatsCollector(db, "plain"), c)
	if got := gather(t, reg, "plain"); got["go_sql_open_connections"] != 1 {
		t.Errorf("go_sql_open_connections = %v, want 1", got["go_sql_open_connections"])
	}
}

// TestCollectorPerPool: pools tell apart by db_name; the same name twice
// is refused, as it is for the DBStats collector.
func TestCollectorPerPool(t *testing.T) {
	db, err := resilientpg.OpenDB(&killtest.FakeConnector{}, resilientpg.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(resilientprom.NewCollector(db, "a"), resilientprom.NewCollector(db, "b"))
	var dup prometheus.AlreadyRegisteredError
	if err := reg.Register(resilientprom.NewCollector(db, "a")); !errors.As(err, &dup) {
		t.Errorf("second collector for db_name a: err = %v, want AlreadyRegisteredError", err)
	}
}

func query(t *testing.T, db *sql.DB) {
	t.Helper()
	var one int
	if err := db.QueryRow("SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("query: %v (got %d)", err, one)
	}
}

// gather flattens reg's metrics into name{label="value"} -> value, with
// db_name, which every metric must carry as dbName, left out of the key.
// It checks the type and help of the resilientpg families on the way.
func gather(t *testing.T, reg *prometheus.Registry, dbName string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]float64{}
	families := 0
	for _, mf := range mfs {
		name := mf.GetName()
		ours := strings.HasPrefix(name, "resilientpg_")
		if ours {
			families++
			wantType := dto.MetricType_COUNTER
			if slices.Contains(gauges, name) {
				wantType = dto.MetricType_GAUGE
			}
			if mf.GetType() != wantType || mf.GetHelp() == "" || (wantType == dto.MetricType_COUNTER) != strings.HasSuffix(name, "_total") {
				t.Errorf("%s: type %v, help %q; want %v with a help", name, mf.GetType(), mf.GetHelp(), wantType)
			}
		}
		for _, m := range mf.GetMetric() {
			key, labels := name, []string{}
			sawDB := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "db_name" {
					sawDB = lp.GetValue() == dbName
					continue
				}
				labels = append(labels, lp.GetName()+`="`+lp.GetValue()+`"`)
			}
			if !sawDB {
				t.Errorf("%s: no db_name=%q label in %v", name, dbName, m.GetLabel())
			}
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			out[key] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	if families != 0 && families != numFamilies {
		t.Errorf("gathered %d resilientpg families, want %d", families, numFamilies)
	}
	return out
}
