package resilientpg

import (
	"database/sql"
	"strconv"
	"sync/atomic"
	"time"
)

// DiscardReason says why a connection was thrown away at checkout, or
// refused at return. Its String is the label value exporters use.
type DiscardReason uint8

const (
	DiscardMarkedBad    DiscardReason = iota // an earlier error marked it unusable
	DiscardInvalidated                       // older than a server restart, crash or failover
	DiscardMaxAge                            // past its max age
	DiscardMaxIdle                           // idle past resilient_max_idle_time
	DiscardServerClosed                      // the socket check saw the server close or end it
	DiscardLeftInTx                          // closed, or still inside a transaction
	DiscardDriverReset                       // the inner driver's reset or validity check refused it
	DiscardPingFailed                        // the checkout ping failed
	numDiscardReasons
)

var discardNames = [numDiscardReasons]string{"marked_bad", "invalidated", "max_age", "max_idle",
	"server_closed", "left_in_tx", "driver_reset", "ping_failed"}

func (r DiscardReason) String() string {
	if r < numDiscardReasons {
		return discardNames[r]
	}
	return "DiscardReason(" + strconv.Itoa(int(r)) + ")"
}

// DiscardCounts counts by DiscardReason: counts[DiscardMaxAge].
type DiscardCounts [numDiscardReasons]int64

// Total is the sum over every reason.
func (c DiscardCounts) Total() int64 { return sum(c[:]) }

// ClassCounts counts errors by Class: counts[ClassConnLost].
type ClassCounts [numClasses]int64

// Total is the sum over every class.
func (c ClassCounts) Total() int64 { return sum(c[:]) }

// RetryCounts counts failed statements by RetryReason: the retried reasons
// (ReasonNotSent, ReasonReadOnly, ReasonIdempotent, ReasonUnavailable)
// count statements handed back to database/sql to run again, the others
// failures returned to the caller unretried.
type RetryCounts [numRetryReasons]int64

// Retried is the number of statements handed back to run again.
func (c RetryCounts) Retried() int64 {
	var n int64
	for r, k := range c {
		if RetryReason(r).Retried() {
			n += k
		}
	}
	return n
}

// InvalidationCause says what retired every connection of a pool at once.
type InvalidationCause uint8

const (
	InvalidCrash    InvalidationCause = iota // PostgreSQL crash_shutdown (57P02)
	InvalidRestart                           // connects refused, then accepted: a new server
	InvalidReadOnly                          // a demoted primary rejected a write
	InvalidShutdown                          // the server ended every session: MySQL/MariaDB shutdown (1053), or every idle connection found closed at once
	numInvalidationCauses
)

var causeNames = [numInvalidationCauses]string{"crash", "restart", "read_only", "shutdown"}

func (c InvalidationCause) String() string {
	if c < numInvalidationCauses {
		return causeNames[c]
	}
	return "InvalidationCause(" + strconv.Itoa(int(c)) + ")"
}

// InvalidationCounts counts by InvalidationCause.
type InvalidationCounts [numInvalidationCauses]int64

// Total is the sum over every cause.
func (c InvalidationCounts) Total() int64 { return sum(c[:]) }

// TxRetryCause says why RunTx ran a transaction again.
type TxRetryCause uint8

const (
	TxRetrySerialization TxRetryCause = iota // 40001, MySQL 1205 lock wait timeout
	TxRetryDeadlock                          // 40P01, MySQL 1213
	TxRetryConnLost                          // the connection was lost before COMMIT was sent, or BEGIN failed on it
	TxRetryUnique                            // 23505, 1062, with TxRetryUniqueViolation
	TxRetryExtra                             // a code given with TxRetryOn
	numTxRetryCauses
)

var txCauseNames = [numTxRetryCauses]string{"serialization", "deadlock", "conn_lost", "unique", "extra"}

func (c TxRetryCause) String() string {
	if c < numTxRetryCauses {
		return txCauseNames[c]
	}
	return "TxRetryCause(" + strconv.Itoa(int(c)) + ")"
}

// TxRetryCounts counts by TxRetryCause.
type TxRetryCounts [numTxRetryCauses]int64

// Total is the sum over every cause.
func (c TxRetryCounts) Total() int64 { return sum(c[:]) }

// ServerState is what the connect gate believes about the server.
type ServerState uint8

const (
	ServerUp      ServerState = iota // connects go straight through
	ServerSuspect                    // a pooled connection lost its server: one probe decides
	ServerDown                       // connects failed: probes are spaced by backoff
)

var stateNames = [...]string{"up", "suspect", "down"}

func (s ServerState) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "ServerState(" + strconv.Itoa(int(s)) + ")"
}

// GateStats is the connect gate's account of outages.
type GateStats struct {
	State      ServerState   // now
	Outages    int64         // times the gate closed because connects failed
	Downtime   time.Duration // total time closed, the current outage included
	Probes     int64         // connects made while the server was suspect or down
	Waited     int64         // Connect calls that waited for another caller's probe
	FailedFast int64         // Connect calls failed with a ServerDownError
	Held       int64         // Connect calls held back after a recovery while other pools of the server had no connection yet
}

// Stats is a snapshot of what a Connector has done since it was made.
// Counters only grow; the fields marked "now" are gauges. Read it with
// StatsOf or Connector.Stats; the README's Observability section lists each
// field with its exporter name.
type Stats struct {
	ConnsOpened int64 // connections made
	ConnsOpen   int64 // now: made and not yet closed

	ConnectAttempts int64         // dials of the inner connector, probes included
	ConnectFailures ClassCounts   // failed dials, by class
	ConnectTime     time.Duration // total time spent in dials, failed ones included

	Checkouts       int64         // checkouts examined: ResetSession, or a fresh connection's first use
	Discards        DiscardCounts // connections discarded at checkout, by reason
	ReturnsRejected DiscardCounts // connections refused at return (IsValid false), by reason

	Pings        int64         // checkout pings
	PingFailures int64         // checkout pings that failed (the connection was discarded)
	PingTime     time.Duration // total time in checkout pings
	PingTimeMax  time.Duration // the slowest checkout ping

	StatementFailures ClassCounts        // failed statements whose class says something about the connection or server, by class
	Retries           RetryCounts        // failed statements, by whether and why they were retried
	Invalidations     InvalidationCounts // pool-wide invalidations, by cause

	Gate GateStats

	CheckedOut     int64         // now: connections held by callers
	OldestCheckout time.Duration // now: how long the longest-held connection has been out
	LeaksSuspected int64         // checkouts held past resilient_leak_threshold
	LeaksReturned  int64         // of those, returned since
	PoolExhausted  int64         // pool.exhausted reports

	TxAttempts      int64         // transaction attempts RunTx began
	TxRetries       TxRetryCounts // attempts RunTx ran again, by cause
	TxCommitUnknown int64         // Commits whose outcome is unknown (ErrCommitUnknown)
	TxRefused       int64         // statements and Commits the transaction guard refused (ErrTxAborted) without sending them

	Reap ReapStats // the server sessions of connections lost on a dead path, and what the reaper did with them
}

// counters is the live, atomic side of Stats. Each field is bumped at the
// one decision it counts.
type counters struct {
	connsOpened, connsClosed atomic.Int64
	connectFailures          [numClasses]atomic.Int64
	connectNanos             atomic.Int64

	checkouts       atomic.Int64
	discards        [numDiscardReasons]atomic.Int64
	returnsRejected [numDiscardReasons]atomic.Int64

	pings, pingFailures    atomic.Int64
	pingNanos, pingMaxNano atomic.Int64

	statementFailures [numClasses]atomic.Int64
	retries           [numRetryReasons]atomic.Int64
	invalidations     [numInvalidationCauses]atomic.Int64

	outages, probes, waited, failedFast, fleetHeld atomic.Int64
	downNanos                                      atomic.Int64 // closed outages only; the current one is added at snapshot

	checkedOut                    atomic.Int64
	leaksSuspected, leaksReturned atomic.Int64
	poolExhausted                 atomic.Int64

	txAttempts               atomic.Int64
	txRetries                [numTxRetryCauses]atomic.Int64
	commitUnknown, txRefused atomic.Int64

	reapOrphans, reaped, reapNotOurs, reapGone, reapFailed atomic.Int64
}

// maxInto raises m to v if v is larger.
func maxInto(m *atomic.Int64, v int64) {
	for {
		old := m.Load()
		if v <= old || m.CompareAndSwap(old, v) {
			return
		}
	}
}

// Stats returns a snapshot of the connector's counters.
func (c *Connector) Stats() Stats {
	k := &c.stats
	s := Stats{
		ConnsOpened:     k.connsOpened.Load(),
		ConnectAttempts: c.gate.dials.Load(),
		ConnectTime:     time.Duration(k.connectNanos.Load()),
		Checkouts:       k.checkouts.Load(),
		Pings:           k.pings.Load(),
		PingFailures:    k.pingFailures.Load(),
		PingTime:        time.Duration(k.pingNanos.Load()),
		PingTimeMax:     time.Duration(k.pingMaxNano.Load()),
		CheckedOut:      k.checkedOut.Load(),
		LeaksSuspected:  k.leaksSuspected.Load(),
		LeaksReturned:   k.leaksReturned.Load(),
		PoolExhausted:   k.poolExhausted.Load(),
		TxAttempts:      k.txAttempts.Load(),
		TxCommitUnknown: k.commitUnknown.Load(),
		TxRefused:       k.txRefused.Load(),
	}
	load(s.TxRetries[:], k.txRetries[:])
	s.ConnsOpen = s.ConnsOpened - k.connsClosed.Load()
	load(s.ConnectFailures[:], k.connectFailures[:])
	load(s.Discards[:], k.discards[:])
	load(s.ReturnsRejected[:], k.returnsRejected[:])
	load(s.StatementFailures[:], k.statementFailures[:])
	load(s.Retries[:], k.retries[:])
	load(s.Invalidations[:], k.invalidations[:])
	s.Gate = c.gate.stats(k)
	s.Reap = c.reapStats()
	if oldest, ok := c.track.oldest(time.Now()); ok {
		s.OldestCheckout = oldest
	}
	return s
}

// StatsOf returns the counters of the wrapper behind db: a *sql.DB from
// sql.Open("resilientpg"|"resilientmysql", ...), Open or OpenDB. It
// reports false for any other *sql.DB. For a *sql.DB from Open or OpenDB,
// the first call also starts the pool-exhaustion watch, at most one poll of
// db.Stats a second, as turning logging on does.
func StatsOf(db *sql.DB) (Stats, bool) {
	c := connectorOf(db)
	if c == nil {
		return Stats{}, false
	}
	c.watchExhaustion()
	return c.Stats(), true
}

// connectorOf finds the Connector behind db: each Connector hands
// database/sql a Driver of its own, and db.Driver() returns it.
func connectorOf(db *sql.DB) *Connector {
	if db == nil {
		return nil
	}
	d, ok := db.Driver().(*Driver)
	if !ok || d.owner == nil {
		return nil
	}
	return d.owner
}

func load(dst []int64, src []atomic.Int64) {
	for i := range src {
		dst[i] = src[i].Load()
	}
}

func sum(xs []int64) int64 {
	var n int64
	for _, x := range xs {
		n += x
	}
	return n
}
