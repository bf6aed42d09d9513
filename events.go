package resilientpg

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"
)

// LogLevel is the lowest level of the events the wrapper logs
// (resilient_log). A library is silent unless asked, so the default is
// LogOff.
type LogLevel uint8

const (
	LogOff LogLevel = iota
	LogError
	LogWarn
	LogInfo
	LogDebug
)

var logLevelNames = [...]string{"off", "error", "warn", "info", "debug"}

// String returns the DSN spelling of the level.
func (l LogLevel) String() string {
	if int(l) < len(logLevelNames) {
		return logLevelNames[l]
	}
	return "LogLevel(" + strconv.Itoa(int(l)) + ")"
}

func (l LogLevel) slog() slog.Level {
	switch l {
	case LogError:
		return slog.LevelError
	case LogWarn:
		return slog.LevelWarn
	case LogInfo:
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

// event names one kind of log record; its name is the record's "event"
// attribute, a stable name to alert on.
type event uint8

const (
	evServerDown event = iota
	evServerUp
	evPoolInvalidated
	evConnDiscarded
	evConnectFailed
	evLeakSuspected
	evLeakReturned
	evPoolExhausted
	evDriverLog
	evSessionReaped
	evReapSkipped
	evReapFailed
	numEvents
)

var eventNames = [numEvents]string{"server.down", "server.up", "pool.invalidated", "conn.discarded",
	"connect.failed", "leak.suspected", "leak.returned", "pool.exhausted", "driver.log",
	"session.reaped", "session.reap_skipped", "session.reap_failed"}

// eventBurst is how many records of each event may be logged in one second;
// the rest are counted and the count rides on the next record as
// "suppressed". An outage can discard a pool's worth of connections and
// fail hundreds of connects in a second: the log must not become the outage.
var eventBurst = [numEvents]int{evServerDown: 5, evServerUp: 5, evPoolInvalidated: 5, evConnDiscarded: 20,
	evConnectFailed: 1, evLeakSuspected: 20, evLeakReturned: 20, evPoolExhausted: 1, evDriverLog: 5,
	evSessionReaped: 20, evReapSkipped: 20, evReapFailed: 5}

// events is a connector's logger. The zero value logs nothing; enabled is
// the only cost on a hot path, a load and a compare.
type events struct {
	log  *slog.Logger // nil: off
	min  slog.Level
	base []slog.Attr // who the records are about: db.system.name, server.address, server.port
	lim  [numEvents]limiter
}

// init sets the logger up from the options, before the connector is used.
func (e *events) init(o *Options, t target) {
	if o.Log == LogOff {
		return
	}
	e.log, e.min = o.Logger, o.Log.slog()
	if e.log == nil {
		e.log = slog.Default()
	}
	e.base = append(e.base, slog.String("db.system.name", t.system))
	if t.address != "" {
		e.base = append(e.base, slog.String("server.address", t.address))
	}
	if t.port != 0 {
		e.base = append(e.base, slog.Int("server.port", t.port))
	}
}

// enabled reports whether a record at level would be logged; callers check
// it before building attributes.
func (e *events) enabled(level slog.Level) bool { return e.log != nil && level >= e.min }

// emit logs one record, unless its event is over its rate.
func (e *events) emit(ev event, level slog.Level, msg string, attrs ...slog.Attr) {
	if !e.enabled(level) {
		return
	}
	suppressed, ok := e.lim[ev].allow(time.Now(), eventBurst[ev])
	if !ok {
		return
	}
	all := make([]slog.Attr, 0, len(attrs)+len(e.base)+2)
	all = append(all, slog.String("event", eventNames[ev]))
	all = append(all, attrs...)
	all = append(all, e.base...)
	if suppressed > 0 {
		all = append(all, slog.Int("suppressed", suppressed))
	}
	e.log.LogAttrs(context.Background(), level, msg, all...)
}

// limiter allows a burst of records per one-second window.
type limiter struct {
	mu         sync.Mutex
	window     time.Time
	n          int
	suppressed int
}

// allow reports whether a record may go now, and how many were suppressed
// since the last one that went.
func (l *limiter) allow(now time.Time, burst int) (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	if l.n >= burst {
		l.suppressed++
		return 0, false
	}
	l.n++
	s := l.suppressed
	l.suppressed = 0
	return s, true
}

// target is the server a connector talks to, for the records' attributes.
type target struct {
	system  string // OpenTelemetry db.system.name: postgresql, mysql, other_sql
	address string // the first host of the DSN
	port    int
}

// errorType is OpenTelemetry's error.type for err: the SQLSTATE or server
// error number when there is one, else the class.
func errorType(err error) string {
	if pe, ok := asPgError(err); ok {
		return pe
	}
	if n, ok := asMySQLNumber(err); ok {
		return strconv.Itoa(int(n))
	}
	return Classify(err).Label()
}

// errAttrs are the attributes of a record about a failure. The message of
// a driver error never holds a password or a query argument: pgconn
// redacts its config errors, and neither driver puts arguments in errors.
func errAttrs(err error) []slog.Attr {
	return []slog.Attr{slog.String("error.type", errorType(err)), slog.String("class", Classify(err).Label()),
		slog.String("error", err.Error())}
}

// mysqlLogger takes go-sql-driver/mysql's log lines ("closing bad idle
// connection: EOF", ...), which it would otherwise print on stderr, into the
// connector's events at debug; with logging off they go nowhere.
type mysqlLogger struct{ c *Connector }

func (l mysqlLogger) Print(v ...any) {
	e := &l.c.ev
	if !e.enabled(slog.LevelDebug) {
		return
	}
	e.emit(evDriverLog, slog.LevelDebug, strings.TrimSpace(fmt.Sprint(v...)), slog.String("driver", "go-sql-driver/mysql"))
}
