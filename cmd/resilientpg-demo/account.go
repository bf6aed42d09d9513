package main

import (
	"database/sql"
	"fmt"
	"strings"
	"time"

	"github.com/resilientpg/resilientpg"
)

// account is what the wrapper itself saw during one phase: the difference
// of its counters before and after.
type account struct {
	discards      resilientpg.DiscardCounts
	rejected      resilientpg.DiscardCounts
	invalidations resilientpg.InvalidationCounts
	retried       int64
	outages       int64
	probes        int64
	down          time.Duration
	connects      int64
}

// snapshot reads the wrapper's counters; ok is false for the bare driver.
func snapshot(db *sql.DB) (resilientpg.Stats, bool) { return resilientpg.StatsOf(db) }

func accountOf(before, after resilientpg.Stats) account {
	var a account
	for i := range a.discards {
		a.discards[i] = after.Discards[i] - before.Discards[i]
		a.rejected[i] = after.ReturnsRejected[i] - before.ReturnsRejected[i]
	}
	for i := range a.invalidations {
		a.invalidations[i] = after.Invalidations[i] - before.Invalidations[i]
	}
	a.retried = after.Retries.Retried() - before.Retries.Retried()
	a.outages = after.Gate.Outages - before.Gate.Outages
	a.probes = after.Gate.Probes - before.Gate.Probes
	a.down = after.Gate.Downtime - before.Gate.Downtime
	a.connects = after.ConnectAttempts - before.ConnectAttempts
	return a
}

func (a account) String() string {
	var parts []string
	for i, n := range a.discards {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, resilientpg.DiscardReason(i)))
		}
	}
	for i, n := range a.rejected {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s at return", n, resilientpg.DiscardReason(i)))
		}
	}
	out := "discarded " + orNone(parts)
	parts = parts[:0]
	for i, n := range a.invalidations {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, resilientpg.InvalidationCause(i)))
		}
	}
	out += "; pool invalidated " + orNone(parts)
	if a.retried > 0 {
		out += fmt.Sprintf("; %d statements retried (provably unsent)", a.retried)
	}
	out += fmt.Sprintf("; %d connects", a.connects)
	if a.outages > 0 {
		out += fmt.Sprintf("; server down %v (%d outage, %d probes)", a.down.Round(time.Millisecond), a.outages, a.probes)
	}
	return out
}

func orNone(parts []string) string {
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
