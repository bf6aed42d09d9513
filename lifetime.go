package resilientpg

import (
	"math/rand/v2"
	"time"
)

// lifetime is a connection's age limit, fixed once at connect and read-only
// afterwards, so it needs no lock.
type lifetime struct {
	deadline time.Time // zero: no max age
}

// newLifetime draws the connection's own deadline: max age shortened by a
// uniform share of the jitter. Shortening rather than lengthening keeps
// MaxAge a true maximum (useful when a proxy or credential expires at a
// fixed age), as HikariCP does.
func newLifetime(now time.Time, maxAge time.Duration, j Jitter) lifetime {
	if maxAge <= 0 {
		return lifetime{}
	}
	age := maxAge
	if spread := j.of(maxAge); spread > 0 {
		age -= time.Duration(rand.Int64N(int64(spread) + 1))
	}
	return lifetime{deadline: now.Add(age)}
}

// expired reports whether now is at or past the deadline.
func (l lifetime) expired(now time.Time) bool {
	return !l.deadline.IsZero() && !now.Before(l.deadline)
}

// capAt brings the deadline forward to no later than expires (zero: no
// change), less a uniform share of the jitter taken of the time left, so
// that the connections made with one token are not all replaced at its
// expiry either.
func (l lifetime) capAt(now, expires time.Time, j Jitter) lifetime {
	if expires.IsZero() {
		return l
	}
	d := expires
	if left := expires.Sub(now); left > 0 {
		if spread := min(j.of(left), left); spread > 0 {
			d = d.Add(-time.Duration(rand.Int64N(int64(spread) + 1)))
		}
	}
	if l.deadline.IsZero() || d.Before(l.deadline) {
		l.deadline = d
	}
	return l
}
