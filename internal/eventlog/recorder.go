// Package eventlog keeps the slog records a test's wrapper logs, so tests
// can assert on events by name. It is shared by the package's own tests,
// the real-server suite and the exporter modules.
package eventlog

import (
	"context"
	"log/slog"
	"sync"
)

// Recorder is a slog.Handler that keeps every record, its attributes
// flattened to dotted keys ("oldest.1.stack"). It is safe for concurrent use.
type Recorder struct {
	mu   sync.Mutex
	recs []Record
}

// Record is one kept record.
type Record struct {
	Level slog.Level
	Msg   string
	Attrs map[string]slog.Value
}

// Logger returns a logger that writes to r.
func (r *Recorder) Logger() *slog.Logger { return slog.New(r) }

// Enabled keeps every level: the wrapper filters by its own resilient_log.
func (r *Recorder) Enabled(context.Context, slog.Level) bool { return true }

// WithAttrs and WithGroup are not used by the wrapper.
func (r *Recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *Recorder) WithGroup(string) slog.Handler      { return r }

// Handle keeps rec.
func (r *Recorder) Handle(_ context.Context, rec slog.Record) error {
	m := map[string]slog.Value{}
	rec.Attrs(func(a slog.Attr) bool { flatten(m, "", a); return true })
	r.mu.Lock()
	r.recs = append(r.recs, Record{rec.Level, rec.Message, m})
	r.mu.Unlock()
	return nil
}

func flatten(m map[string]slog.Value, prefix string, a slog.Attr) {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		for _, g := range v.Group() {
			flatten(m, prefix+a.Key+".", g)
		}
		return
	}
	m[prefix+a.Key] = v
}

// Events returns the records whose "event" attribute is name.
func (r *Recorder) Events(name string) []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Record
	for _, rec := range r.recs {
		if rec.Attrs["event"].String() == name {
			out = append(out, rec)
		}
	}
	return out
}

// All returns every record kept so far.
func (r *Recorder) All() []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Record(nil), r.recs...)
}
