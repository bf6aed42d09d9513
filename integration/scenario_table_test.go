package integration

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// envScenarioTable names a file that receives the scenario table, so that
// the CI script can print both drivers' counts.
const envScenarioTable = "RESILIENTPG_SCENARIO_TABLE"

// scOp is one operation as the application saw it; times are relative to
// the scenario's start.
type scOp struct {
	start, end time.Duration
	val        int64 // what the operation returned or wrote (a session id, a row id)
	err        error
}

func (o scOp) latency() time.Duration { return o.end - o.start }

// scRec collects the operations of one pool from concurrent workers.
type scRec struct {
	mu  sync.Mutex
	ops []scOp
}

func (r *scRec) add(o scOp) {
	r.mu.Lock()
	r.ops = append(r.ops, o)
	r.mu.Unlock()
}

// snapshot returns the operations in start order.
func (r *scRec) snapshot() []scOp {
	r.mu.Lock()
	ops := slices.Clone(r.ops)
	r.mu.Unlock()
	slices.SortStableFunc(ops, func(a, b scOp) int { return int(a.start - b.start) })
	return ops
}

// scSummary is a table row's numbers.
type scSummary struct {
	ops, failed int
	p99         time.Duration
	firstErr    string // of the earliest failed operation
}

func summarize(ops []scOp) scSummary {
	s := scSummary{ops: len(ops)}
	lat := make([]time.Duration, 0, len(ops))
	var first *scOp
	for i := range ops {
		o := &ops[i]
		lat = append(lat, o.latency())
		if o.err != nil {
			s.failed++
			if first == nil || o.end < first.end {
				first = o
			}
		}
	}
	if first != nil {
		s.firstErr = first.err.Error()
	}
	s.p99 = percentile(lat, 99)
	return s
}

// percentile is the nearest-rank percentile.
func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[(len(s)*p+99)/100-1]
}

// scRow is one line of the table.
type scRow struct {
	engine, scenario, driver string
	sum                      scSummary
	note                     string
}

// scTable gathers the rows of every subtest of TestFaultScenarios.
type scTable struct {
	mu   sync.Mutex
	rows []scRow
}

func (tb *scTable) add(r scRow) {
	tb.mu.Lock()
	tb.rows = append(tb.rows, r)
	tb.mu.Unlock()
}

// render formats the table with aligned columns; the first error of each
// row follows in the note.
func (tb *scTable) render() string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	head := []string{"engine", "scenario", "driver", "ops", "failed", "p99", "note"}
	cells := [][]string{head}
	for _, r := range tb.rows {
		note := r.note
		if r.sum.firstErr != "" {
			if note != "" {
				note += "; "
			}
			note += "first error: " + truncate(oneLine(r.sum.firstErr), 110)
		}
		cells = append(cells, []string{r.engine, r.scenario, r.driver,
			strconv.Itoa(r.sum.ops), strconv.Itoa(r.sum.failed), fmtDur(r.sum.p99), note})
	}
	width := make([]int, len(head))
	for _, row := range cells {
		for i, c := range row {
			width[i] = max(width[i], len(c))
		}
	}
	var b strings.Builder
	line := func(row []string) {
		for i, c := range row {
			if i > 0 {
				b.WriteString(" | ")
			}
			if i == len(row)-1 {
				b.WriteString(c) // no trailing padding on the note
				continue
			}
			if i >= 3 && i <= 5 {
				fmt.Fprintf(&b, "%*s", width[i], c) // numbers right-aligned
			} else {
				fmt.Fprintf(&b, "%-*s", width[i], c)
			}
		}
		b.WriteString("\n")
	}
	line(cells[0])
	sep := make([]string, len(head))
	for i := range sep {
		sep[i] = strings.Repeat("-", width[i])
	}
	line(sep)
	for _, row := range cells[1:] {
		line(row)
	}
	return b.String()
}

// emit logs the table and, if envScenarioTable names a file, writes it
// there.
func (tb *scTable) emit(t *testing.T) {
	t.Helper()
	out := tb.render()
	t.Logf("fault scenarios, wrapper asserted, bare driver only measured:\n%s", out)
	if path := os.Getenv(envScenarioTable); path != "" {
		header := "Fault scenarios (integration.TestFaultScenarios): the wrapper is asserted, the bare driver only measured.\n"
		if err := os.WriteFile(path, []byte(header+out), 0o644); err != nil {
			t.Errorf("write %s=%s: %v", envScenarioTable, path, err)
		}
	}
}

func fmtDur(d time.Duration) string {
	switch {
	case d >= 10*time.Millisecond:
		return d.Round(time.Millisecond).String()
	case d >= 10*time.Microsecond:
		return d.Round(10 * time.Microsecond).String()
	}
	return d.String()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
