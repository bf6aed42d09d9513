package resilientpg

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/resilientpg/resilientpg/internal/eventlog"
)

// logged returns options that log everything from level up to a recorder.
func logged(level LogLevel, mod func(*Options)) (Options, *eventlog.Recorder) {
	rec := &eventlog.Recorder{}
	return opts(func(o *Options) {
		o.Log, o.Logger = level, rec.Logger()
		if mod != nil {
			mod(o)
		}
	}), rec
}

// TestOutageEvents: one outage gives one server.down and one server.up,
// whose downtime is within half a backoff cap of the real one, and the gate
// counters tell the story.
func TestOutageEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o, rec := logged(LogInfo, nil)
		c, f := newFakeConnector(shapePgx, o)
		f.setConnectErr(errRefused)
		const outage = 3 * time.Second
		go func() {
			time.Sleep(outage)
			f.setConnectErr(nil)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		for range 5 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := c.Connect(ctx); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		down, up := rec.Events("server.down"), rec.Events("server.up")
		if len(down) != 1 || len(up) != 1 {
			t.Fatalf("%d server.down and %d server.up records, want 1 and 1", len(down), len(up))
		}
		if down[0].Level != slog.LevelWarn || down[0].Attrs["class"].String() != "cannot_connect" ||
			!strings.Contains(down[0].Attrs["error"].String(), "refused") {
			t.Errorf("server.down = %v", down[0])
		}
		got := up[0].Attrs["downtime"].Duration()
		if d := got - outage; d < -time.Second/2 || d > time.Second/2 {
			t.Errorf("server.up downtime %v, want within 0.5s of %v", got, outage)
		}
		s := c.Stats()
		if s.Gate.Outages != 1 || s.Gate.State != ServerUp || s.Gate.Downtime != got {
			t.Errorf("gate stats %+v, want 1 outage, up, downtime %v", s.Gate, got)
		}
		if p := up[0].Attrs["probes"].Int64(); p < 2 || p != s.Gate.Probes {
			t.Errorf("probes: event %d, stats %d; want the same, at least 2", p, s.Gate.Probes)
		}
		if s.Gate.Waited < 1 || s.ConnectFailures[ClassCannotConnect] != s.ConnectAttempts-5 {
			t.Errorf("waited %d, refused %d of %d attempts; want waiters and every attempt but 5 refused",
				s.Gate.Waited, s.ConnectFailures[ClassCannotConnect], s.ConnectAttempts)
		}
		if s.Invalidations[InvalidRestart] != 1 || len(rec.Events("pool.invalidated")) != 1 {
			t.Errorf("refused-then-accepted must invalidate once: %v", s.Invalidations)
		} else if r := rec.Events("pool.invalidated")[0]; r.Attrs["cause"].String() != "restart" || r.Level != slog.LevelWarn {
			t.Errorf("pool.invalidated = %+v, want cause restart at warn", r)
		}
	})
}

// TestEventRateLimit: a burst past an event's rate is counted, not logged,
// and the count rides on the next record that goes.
func TestEventRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o, rec := logged(LogDebug, nil)
		c, _ := newFakeConnector(shapePgx, o)
		for range 25 {
			c.ev.emit(evConnDiscarded, slog.LevelDebug, "x")
		}
		if n := len(rec.Events("conn.discarded")); n != eventBurst[evConnDiscarded] {
			t.Fatalf("%d records in a burst of 25, want %d", n, eventBurst[evConnDiscarded])
		}
		time.Sleep(time.Second)
		c.ev.emit(evConnDiscarded, slog.LevelDebug, "x")
		all := rec.Events("conn.discarded")
		if got := all[len(all)-1].Attrs["suppressed"].Int64(); got != 5 {
			t.Errorf("suppressed = %d, want 5", got)
		}
	})
}

// TestLogOffIsSilent: with resilient_log=off nothing reaches any handler,
// go-sql-driver/mysql's own lines included; on, those go to the logger at
// debug with the connector's attributes.
func TestLogOffIsSilent(t *testing.T) {
	quiet := &eventlog.Recorder{}
	prev := slog.Default()
	slog.SetDefault(slog.New(quiet))
	defer slog.SetDefault(prev)

	c, err := NewConnector(&mysql.MySQLDriver{}, DefaultOptions(), "app:secret@tcp(db.example:3307)/app")
	if err != nil {
		t.Fatal(err)
	}
	mysqlLogger{c}.Print("connection.go:803 ", "closing bad idle connection: ", io.EOF)
	c.ev.emit(evServerDown, slog.LevelError, "x")
	if len(quiet.All()) != 0 {
		t.Fatalf("logging off, yet %d records", len(quiet.All()))
	}

	c, err = NewConnector(&mysql.MySQLDriver{}, DefaultOptions(), "app:secret@tcp(db.example:3307)/app?resilient_log=debug")
	if err != nil {
		t.Fatal(err)
	}
	mysqlLogger{c}.Print("connection.go:803 ", "closing bad idle connection: ", io.EOF)
	recs := quiet.Events("driver.log")
	if len(recs) != 1 {
		t.Fatalf("%d driver.log records, want 1 (to slog.Default)", len(recs))
	}
	a := recs[0].Attrs
	if recs[0].Level != slog.LevelDebug || !strings.Contains(recs[0].Msg, "closing bad idle connection") ||
		a["db.system.name"].String() != "mysql" || a["server.address"].String() != "db.example" || a["server.port"].Int64() != 3307 {
		t.Errorf("driver.log record %+v", recs[0])
	}
	for _, r := range quiet.All() {
		for _, v := range r.Attrs {
			if strings.Contains(v.String(), "secret") || strings.Contains(r.Msg, "secret") {
				t.Errorf("a record carries the password: %+v", r)
			}
		}
	}
}

// TestConnectFailedEvent names the error by type and class.
func TestConnectFailedEvent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		o, rec := logged(LogWarn, func(o *Options) { o.ConnectWait = 0 })
		c, f := newFakeConnector(shapePgx, o)
		f.setConnectErr(errRefused)
		c.Connect(context.Background())
		recs := rec.Events("connect.failed")
		if len(recs) != 1 || recs[0].Attrs["error.type"].String() != "cannot_connect" {
			t.Fatalf("connect.failed records %+v", recs)
		}
		if got := c.Stats().ConnectFailures[ClassCannotConnect]; got != 1 {
			t.Errorf("connect failures by class = %d, want 1", got)
		}
	})
}

// TestPoolInvalidatedEvent: every invalidation logs one pool.invalidated
// at warn whose cause attribute names the cause, the way the counters and
// exporters spell it; at resilient_log=error it is counted, not logged.
// The crash comes the way the code meets it, from a failed statement.
func TestPoolInvalidatedEvent(t *testing.T) {
	for cause := range numInvalidationCauses {
		t.Run(cause.String(), func(t *testing.T) {
			o, rec := logged(LogWarn, nil)
			c, f := newFakeConnector(shapePgx, o)
			w, _ := connect(c, f)
			if cause == InvalidCrash {
				w.handleErr(context.Background(), errCrash, false)
			} else if !c.invalidate(w.gen, cause) {
				t.Fatal("invalidate refused a first report")
			}
			recs := rec.Events("pool.invalidated")
			if len(recs) != 1 {
				t.Fatalf("%d pool.invalidated records, want 1", len(recs))
			}
			if recs[0].Level != slog.LevelWarn || recs[0].Attrs["cause"].String() != cause.String() {
				t.Errorf("pool.invalidated = level %v, cause %q; want warn, %q", recs[0].Level, recs[0].Attrs["cause"].String(), cause)
			}
			if got := c.Stats().Invalidations; got[cause] != 1 || got.Total() != 1 {
				t.Errorf("invalidations %v, want one %s", got, cause)
			}
		})
	}
	o, rec := logged(LogError, nil)
	c, f := newFakeConnector(shapePgx, o)
	w, _ := connect(c, f)
	c.invalidate(w.gen, InvalidShutdown)
	if n := len(rec.Events("pool.invalidated")); n != 0 || c.Stats().Invalidations[InvalidShutdown] != 1 {
		t.Errorf("resilient_log=error: %d pool.invalidated records (want 0: it is a warning), invalidations %v", n, c.Stats().Invalidations)
	}
}
