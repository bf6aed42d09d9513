package resilientotel_test

import (
	"context"
	"database/sql"
	"maps"
	"slices"
	"strings"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/killtest"
	resilientotel "github.com/resilientpg/resilientpg/otel"
)

// kinds is every instrument with its kind and unit.
var kinds = map[string]string{
	"db.client.connection.count": "updown {connection}", "db.client.connection.max": "updown {connection}",
	"resilientpg.connections.opened": "counter {connection}", "resilientpg.connections.open": "updown {connection}",
	"resilientpg.connect.attempts": "counter {attempt}", "resilientpg.connect.failures": "counter {attempt}",
	"resilientpg.connect.duration": "counter s", "resilientpg.checkouts": "counter {checkout}",
	"resilientpg.discards": "counter {connection}", "resilientpg.returns.rejected": "counter {connection}",
	"resilientpg.pings": "counter {ping}", "resilientpg.ping.failures": "counter {ping}",
	"resilientpg.ping.duration": "counter s", "resilientpg.ping.duration.max": "gauge s",
	"resilientpg.statement.failures": "counter {statement}", "resilientpg.statement.retries": "counter {statement}",
	"resilientpg.statement.not_retried": "counter {statement}", "resilientpg.invalidations": "counter {invalidation}",
	"resilientpg.server.state": "updown 1", "resilientpg.outages": "counter {outage}",
	"resilientpg.downtime": "counter s", "resilientpg.connect.probes": "counter {attempt}",
	"resilientpg.connect.waited": "counter {call}", "resilientpg.connect.failed_fast": "counter {call}", "resilientpg.connect.held": "counter {call}",
	"resilientpg.checked_out": "updown {connection}", "resilientpg.checkout.oldest": "gauge s",
	"resilientpg.leaks.suspected": "counter {checkout}", "resilientpg.leaks.returned": "counter {checkout}",
	"resilientpg.pool.exhausted": "counter {report}",
	"resilientpg.tx.attempts":    "counter {transaction}", "resilientpg.tx.retries": "counter {transaction}",
	"resilientpg.tx.commit_unknown": "counter {transaction}", "resilientpg.tx.refused": "counter {statement}",
	"resilientpg.reap.orphans": "counter {connection}", "resilientpg.reap.sessions": "counter {session}",
	"resilientpg.reap.off": "updown 1",
}

// synthetic is killtest.Synthetic with values of their own in Reap too.
func TestRegisterMapsEveryField(t *testing.T) {
	db := sql.OpenDB(&killtest.FakeConnector{})
	defer db.Close()
	db.SetMaxOpenConns(7)
	query(t, db)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	if _, err := resilientotel.RegisterFrom(db, "orders", mp, func() (resilientpg.Stats, bool) { return killtest.Synthetic(), true }); err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		"db.client.connection.count{db.client.connection.state=idle}": 1, "db.client.connection.max": 7,
		"db.client.connection.count{db.client.connection.state=used}": 0, "resilientpg.pool.exhausted": 114,
		"resilientpg.connections.opened": 101, "resilientpg.connections.open": 102,
		"resilientpg.connect.attempts": 103, "resilientpg.connect.duration": 1.5,
		"resilientpg.checkouts": 104, "resilientpg.pings": 105, "resilientpg.ping.failures": 106,
		"resilientpg.ping.duration": 2.5, "resilientpg.ping.duration.max": 0.25,
		"resilientpg.server.state{state=up}": 0, "resilientpg.server.state{state=suspect}": 1,
		"resilientpg.server.state{state=down}": 0, "resilientpg.outages": 107,
		"resilientpg.downtime": 3, "resilientpg.connect.probes": 108,
		"resilientpg.connect.waited": 109, "resilientpg.connect.failed_fast": 110, "resilientpg.connect.held": 123,
		"resilientpg.checked_out": 111, "resilientpg.checkout.oldest": 4,
		"resilientpg.leaks.suspected": 112, "resilientpg.leaks.returned": 113,
		"resilientpg.tx.attempts": 115, "resilientpg.tx.commit_unknown": 116, "resilientpg.tx.refused": 117,
		"resilientpg.reap.orphans": 118, "resilientpg.reap.sessions{outcome=reaped}": 119,
		"resilientpg.reap.sessions{outcome=not_ours}": 120, "resilientpg.reap.sessions{outcome=gone}": 121,
		"resilientpg.reap.sessions{outcome=failed}": 122, "resilientpg.reap.off": 1,
	}
	for i, l := range killtest.TxCauseLabels {
		want["resilientpg.tx.retries{cause="+l+"}"] = float64(800 + i)
	}
	for i, l := range killtest.ClassLabels {
		want["resilientpg.connect.failures{error.type="+l+"}"] = float64(201 + i)
		want["resilientpg.statement.failures{error.type="+l+"}"] = float64(501 + i)
	}
	for i, l := range killtest.DiscardLabels {
		want["resilientpg.discards{reason="+l+"}"] = float64(300 + i)
		want["resilientpg.returns.rejected{reason="+l+"}"] = float64(400 + i)
	}
	for i, l := range killtest.NotRetriedLabels {
		want["resilientpg.statement.not_retried{reason="+l+"}"] = float64(600 + i)
	}
	for i, l := range killtest.RetriedLabels {
		want["resilientpg.statement.retries{reason="+l+"}"] = float64(600 + len(killtest.NotRetriedLabels) + i)
	}
	for i, l := range killtest.CauseLabels {
		want["resilientpg.invalidations{cause="+l+"}"] = float64(700 + i)
	}
	got := collect(t, reader, "orders")
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if g, ok := got[k]; !ok || g != want[k] {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, want[k])
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected data point %s", k)
		}
	}
}

// TestRegisterReap: the reaper's account, alone in an otherwise zero
// Stats, reaches its own instruments with the outcome attribute, and
// reap.off follows Off both ways.
func TestRegisterReap(t *testing.T) {
	db := sql.OpenDB(&killtest.FakeConnector{})
	defer db.Close()
	for _, off := range []bool{false, true} {
		s := resilientpg.Stats{Reap: resilientpg.ReapStats{Orphans: 9, Reaped: 4, NotOurs: 2, Gone: 1, Failed: 1, Off: off}}
		reader := sdkmetric.NewManualReader()
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
		if _, err := resilientotel.RegisterFrom(db, "orders", mp, func() (resilientpg.Stats, bool) { return s, true }); err != nil {
			t.Fatal(err)
		}
		got := collect(t, reader, "orders")
		wantOff := 0.0
		if off {
			wantOff = 1
		}
		for k, v := range map[string]float64{
			"resilientpg.reap.orphans":                    9,
			"resilientpg.reap.sessions{outcome=reaped}":   4,
			"resilientpg.reap.sessions{outcome=not_ours}": 2,
			"resilientpg.reap.sessions{outcome=gone}":     1,
			"resilientpg.reap.sessions{outcome=failed}":   1,
			"resilientpg.reap.off":                        wantOff,
		} {
			if g, ok := got[k]; !ok || g != v {
				t.Errorf("Off %v: %s = %v (present %v), want %v", off, k, g, ok, v)
			}
		}
		n := 0
		for k := range got {
			if strings.HasPrefix(k, "resilientpg.reap.sessions") {
				n++
			}
		}
		if n != 4 {
			t.Errorf("Off %v: %d resilientpg.reap.sessions data points, want 4", off, n)
		}
	}
}

func TestRegisterOverTheWrapper(t *testing.T) {
	fc := &killtest.FakeConnector{}
	db, err := resilientpg.OpenDB(fc, resilientpg.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	query(t, db)
	fc.FailNextReset() // the next checkout refuses it
	query(t, db)

	reader := sdkmetric.NewManualReader()
	reg, err := resilientotel.Register(db, "orders", sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)))
	if err != nil {
		t.Fatal(err)
	}
	got := collect(t, reader, "orders")
	s, _ := resilientpg.StatsOf(db)
	t.Logf("stats: %+v", s)
	for k, v := range map[string]float64{
		"resilientpg.discards{reason=driver_reset}":                   1,
		"resilientpg.connections.opened":                              2,
		"resilientpg.connections.open":                                1,
		"resilientpg.connect.attempts":                                2,
		"resilientpg.server.state{state=up}":                          1,
		"db.client.connection.count{db.client.connection.state=idle}": 1,
	} {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if _, ok := got["db.client.connection.max"]; ok {
		t.Errorf("db.client.connection.max reported for an unlimited pool: %v", got["db.client.connection.max"])
	}
	if err := reg.Unregister(); err != nil {
		t.Fatal(err)
	}
	if got := collect(t, reader, "orders"); len(got) != 0 {
		t.Errorf("after Unregister: %d data points, want none", len(got))
	}
}

func TestRegisterPlainDB(t *testing.T) {
	db := sql.OpenDB(&killtest.FakeConnector{})
	defer db.Close()
	query(t, db)
	reader := sdkmetric.NewManualReader()
	otel.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)))
	if _, err := resilientotel.Register(db, "plain", nil); err != nil { // nil: the global provider
		t.Fatal(err)
	}
	got := collect(t, reader, "plain")
	want := map[string]float64{
		"db.client.connection.count{db.client.connection.state=idle}": 1,
		"db.client.connection.count{db.client.connection.state=used}": 0,
	}
	if !maps.Equal(got, want) {
		t.Errorf("a plain *sql.DB reported %v, want only %v", got, want)
	}
}

func query(t *testing.T, db *sql.DB) {
	t.Helper()
	var one int
	if err := db.QueryRow("SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("query: %v (got %d)", err, one)
	}
}

// collect reads reader once and flattens it into name{key=value,...} ->
// value, with db.client.connection.pool.name, which every point must carry
// as pool, left out of the key. It checks each instrument's kind and unit
// against kinds on the way.
func collect(t *testing.T, reader *sdkmetric.ManualReader, pool string) map[string]float64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("collect: %v", err)
	}
	out := map[string]float64{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != resilientotel.ScopeName {
			t.Errorf("scope %q, want %q", sm.Scope.Name, resilientotel.ScopeName)
		}
		for _, m := range sm.Metrics {
			var kind string
			add := func(v float64, attrs []string) {
				key, labels := m.Name, []string{}
				sawPool := false
				for _, a := range attrs {
					if a == "db.client.connection.pool.name="+pool {
						sawPool = true
					} else {
						labels = append(labels, a)
					}
				}
				if !sawPool {
					t.Errorf("%s: no pool name %q in %v", m.Name, pool, attrs)
				}
				if len(labels) > 0 {
					key += "{" + strings.Join(labels, ",") + "}"
				}
				out[key] = v
			}
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				kind = map[bool]string{true: "counter", false: "updown"}[d.IsMonotonic]
				for _, p := range d.DataPoints {
					add(float64(p.Value), attrStrings(p.Attributes.ToSlice()))
				}
			case metricdata.Sum[float64]:
				kind = map[bool]string{true: "counter", false: "updown"}[d.IsMonotonic]
				for _, p := range d.DataPoints {
					add(p.Value, attrStrings(p.Attributes.ToSlice()))
				}
			case metricdata.Gauge[float64]:
				kind = "gauge"
				for _, p := range d.DataPoints {
					add(p.Value, attrStrings(p.Attributes.ToSlice()))
				}
			default:
				t.Errorf("%s: unexpected data %T", m.Name, m.Data)
			}
			if got := kind + " " + m.Unit; got != kinds[m.Name] || m.Description == "" {
				t.Errorf("%s: %q with description %q, want %q with a description", m.Name, got, m.Description, kinds[m.Name])
			}
		}
	}
	return out
}

func attrStrings(kvs []attribute.KeyValue) []string {
	s := make([]string, len(kvs))
	for i, kv := range kvs {
		s[i] = string(kv.Key) + "=" + kv.Value.String()
	}
	return s
}
