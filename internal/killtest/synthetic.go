package killtest

import (
	"time"

	"github.com/resilientpg/resilientpg"
)

// Synthetic gives every field of Stats a value of its own, so that an
// exporter reading the wrong field cannot pass its test.
func Synthetic() resilientpg.Stats {
	s := resilientpg.Stats{ConnsOpened: 101, ConnsOpen: 102, ConnectAttempts: 103,
		ConnectTime: 1500 * time.Millisecond, Checkouts: 104, Pings: 105, PingFailures: 106,
		PingTime: 2500 * time.Millisecond, PingTimeMax: 250 * time.Millisecond,
		Gate: resilientpg.GateStats{State: resilientpg.ServerSuspect, Outages: 107, Downtime: 3 * time.Second,
			Probes: 108, Waited: 109, FailedFast: 110, Held: 123},
		CheckedOut: 111, OldestCheckout: 4 * time.Second, LeaksSuspected: 112, LeaksReturned: 113, PoolExhausted: 114,
		TxAttempts: 115, TxCommitUnknown: 116, TxRefused: 117,
		Reap: resilientpg.ReapStats{Orphans: 118, Reaped: 119, NotOurs: 120, Gone: 121, Failed: 122, Off: true}}
	for i := range s.TxRetries {
		s.TxRetries[i] = int64(800 + i)
	}
	for i := range s.ConnectFailures {
		s.ConnectFailures[i], s.StatementFailures[i] = int64(200+i), int64(500+i)
	}
	for i := range s.Discards {
		s.Discards[i], s.ReturnsRejected[i] = int64(300+i), int64(400+i)
	}
	for i := range s.Retries {
		s.Retries[i] = int64(600 + i)
	}
	for i := range s.Invalidations {
		s.Invalidations[i] = int64(700 + i)
	}
	return s
}
