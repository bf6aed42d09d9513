package resilientpg

import (
	"context"
	"database/sql/driver"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// fleetServer is a server that refuses until up, then lets each session in
// after rtt. It records, per connector, when the first session got in and
// when a second began.
type fleetServer struct {
	up   time.Time
	rtt  time.Duration
	busy time.Duration // once a session got in, the next take this instead of rtt

	mu          sync.Mutex
	downDials   int
	firstIn     map[int]time.Time
	secondBegan map[int]time.Time
}

type fleetMember struct {
	s     *fleetServer
	id    int
	dials atomic.Int64 // dials once the server is up
}

func (m *fleetMember) Connect(ctx context.Context) (driver.Conn, error) {
	s := m.s
	if time.Now().Before(s.up) {
		s.mu.Lock()
		s.downDials++
		s.mu.Unlock()
		return nil, errRefused
	}
	k := m.dials.Add(1)
	if k == 2 {
		s.mu.Lock()
		s.secondBegan[m.id] = time.Now()
		s.mu.Unlock()
	}
	rtt := s.rtt
	s.mu.Lock()
	if len(s.firstIn) > 0 && s.busy > 0 {
		rtt = s.busy
	}
	s.mu.Unlock()
	select {
	case <-time.After(rtt):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	if _, ok := s.firstIn[m.id]; !ok {
		s.firstIn[m.id] = time.Now()
	}
	s.mu.Unlock()
	return &fakeConn{valid: true}, nil
}
func (m *fleetMember) Driver() driver.Driver { return nil }

// fleetOutage runs n connectors of one server, callers each asking for a
// connection from the moment the server is found refused, and returns
// the server's record once every caller has its connection. The first
// session takes rtt to get in, the others busy (rtt if 0). shared says
// whether the connectors share a serverFleet, as connectors of one
// server in one process do.
func fleetOutage(t *testing.T, n, callers int, shared bool, rtt, busy time.Duration) *fleetServer {
	start := time.Now()
	s := &fleetServer{up: start.Add(time.Second), rtt: rtt, busy: busy,
		firstIn: map[int]time.Time{}, secondBegan: map[int]time.Time{}}
	f := &serverFleet{}
	var wg sync.WaitGroup
	for i := range n {
		c, err := NewConnector(&fleetMember{s: s, id: i}, opts(nil))
		require.NoError(t, err)
		if shared {
			c.gate.fleet = f
		}
		c.gate.mu.Lock()
		c.gate.close(errRefused)
		c.gate.mu.Unlock()
		c.gate.fleet.probed(false, false, true)
		for range callers {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if _, err := c.Connect(ctx); err != nil {
					t.Errorf("Connect: %v", err)
				}
			})
		}
	}
	wg.Wait()
	return s
}

// TestFleetProbesInTurn: 20 connectors of one server probe it in turn
// while it refuses, about one probe per interval in all instead of one
// per interval each, and every one of them has its first connection
// within an interval and a connect of the server's return.
func TestFleetProbesInTurn(t *testing.T) {
	for _, shared := range []bool{true, false} {
		synctest.Test(t, func(t *testing.T) {
			s := fleetOutage(t, 20, 2, shared, 50*time.Millisecond, 0)
			var last time.Duration
			for _, in := range s.firstIn {
				last = max(last, in.Sub(s.up))
			}
			t.Logf("shared %v: %d dials in the 1 s the server refused; last first connection up+%v", shared, s.downDials, last)
			require.Len(t, s.firstIn, 20)
			if !shared {
				// Without the fleet each probes on its own: the contrast.
				require.Greater(t, s.downDials, 20*20, "unshared connectors should each probe about 33 times a second")
				return
			}
			// One turn per interval (30 ms, jittered: 15 ms at least).
			require.LessOrEqual(t, s.downDials, 1000/15+1, "dials while the server refused")
			// The probe after the server's return comes within 1.5
			// intervals; the others go at once when it gets in.
			require.LessOrEqual(t, last, 45*time.Millisecond+2*s.rtt+time.Millisecond, "last connector's first connection after up")
		})
	}
}

// TestFleetFirstConnectionsFirst: once the server is back, no connector
// begins a second connection before every connector of the server has
// its first, so that the last pool's first waits for one session per
// pool, not for every pool's full demand.
//
// When, after the first, sessions take 400 ms to get in (a server letting
// in a whole fleet, one forked process after another), longer than a
// probe may dial before a hedge would start beside it, the probes are not
// hedged: a hedge would be a second session of its pool, ahead of other
// pools' first.
func TestFleetFirstConnectionsFirst(t *testing.T) {
	for _, busy := range []time.Duration{0, 400 * time.Millisecond} {
		t.Run("busy="+busy.String(), func(t *testing.T) { testFleetFirstConnectionsFirst(t, busy) })
	}
}

func testFleetFirstConnectionsFirst(t *testing.T, busy time.Duration) {
	synctest.Test(t, func(t *testing.T) {
		s := fleetOutage(t, 10, 3, true, 50*time.Millisecond, busy)
		require.Len(t, s.firstIn, 10)
		var lastFirst time.Time
		for _, in := range s.firstIn {
			if in.After(lastFirst) {
				lastFirst = in
			}
		}
		require.NotEmpty(t, s.secondBegan, "callers beyond the first should have dialed")
		for id, began := range s.secondBegan {
			require.False(t, began.Before(lastFirst), "connector %d began a second connection %v before the last first one got in",
				id, lastFirst.Sub(began))
		}
	})
}

// TestFleetHoldIsBounded: a connector of the server that stays down (its
// own reason: its role is over its connection limit) holds the others'
// further connects for fleetWindow at most.
func TestFleetHoldIsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &serverFleet{}
		ok, err := NewConnector(&fleetMember{s: &fleetServer{firstIn: map[int]time.Time{}, secondBegan: map[int]time.Time{}}}, opts(nil))
		require.NoError(t, err)
		ok.gate.fleet = f
		stuck, err := NewConnector(connectorFunc(func(ctx context.Context) (driver.Conn, error) {
			return nil, &pgconn.PgError{Severity: "FATAL", Code: "53300", Message: "too many connections for role"}
		}), opts(nil))
		require.NoError(t, err)
		stuck.gate.fleet = f

		// The healthy connector recovers from an outage of its own.
		ok.gate.mu.Lock()
		ok.gate.close(errRefused)
		ok.gate.mu.Unlock()
		_, err = ok.Connect(context.Background())
		require.NoError(t, err)
		// The other keeps a caller waiting.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go stuck.Connect(ctx)
		synctest.Wait()
		start := time.Now()
		_, err = ok.Connect(context.Background())
		require.NoError(t, err)
		held := time.Since(start)
		require.LessOrEqual(t, held, fleetWindow, "held by a connector that stays down")
		require.Equal(t, int64(1), ok.Stats().Gate.Held)
		cancel()
		synctest.Wait()
	})
}

type connectorFunc func(ctx context.Context) (driver.Conn, error)

func (f connectorFunc) Connect(ctx context.Context) (driver.Conn, error) { return f(ctx) }
func (f connectorFunc) Driver() driver.Driver                            { return nil }
