package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

// phase is one fault and the workload that meets it. Both drivers' pools
// get the same fault at the same moment and run the workload side by side.
type phase struct {
	name     string
	needsOwn bool // restarts, stops and the proxy need a server we started
	// prepare runs before the workload: warm the pools, inject the fault.
	prepare func(ctx context.Context, s *server, pools []*sql.DB) error
	// A burst of n queries at concurrency c, or steady load for a duration
	// with a fault injected during it.
	n, c   int
	steady time.Duration
	during func(ctx context.Context, s *server) error
}

func warmAll(ctx context.Context, pools []*sql.DB) error {
	for _, db := range pools {
		if err := warm(ctx, db, poolSize); err != nil {
			return err
		}
	}
	return nil
}

func kill(ctx context.Context, s *server) error {
	_, err := s.kill(ctx)
	return err
}

func phases(s *server) []phase {
	return []phase{
		{name: "sessions killed, pool idle 1.5s", n: 200, c: 10,
			prepare: func(ctx context.Context, s *server, pools []*sql.DB) error {
				if err := warmAll(ctx, pools); err != nil {
					return err
				}
				time.Sleep(1500 * time.Millisecond)
				return kill(ctx, s)
			}},
		{name: "sessions killed right after use", n: 200, c: 10,
			prepare: func(ctx context.Context, s *server, pools []*sql.DB) error {
				if err := warmAll(ctx, pools); err != nil {
					return err
				}
				return kill(ctx, s)
			}},
		{name: "server restarted, pool idle", n: 200, c: 10, needsOwn: true,
			prepare: func(ctx context.Context, s *server, pools []*sql.DB) error {
				if err := warmAll(ctx, pools); err != nil {
					return err
				}
				if err := s.stop(faultlab.StopFast); err != nil {
					return err
				}
				return s.start(ctx)
			}},
		{name: "half-open (black-holed), pool idle 2s", n: 100, c: 10, needsOwn: true,
			prepare: func(ctx context.Context, s *server, pools []*sql.DB) error {
				if err := warmAll(ctx, pools); err != nil {
					return err
				}
				time.Sleep(2 * time.Second)
				s.proxy.BlackholeAll()
				return nil
			}},
		{name: "restart under load", steady: 6 * time.Second, needsOwn: true,
			during: func(ctx context.Context, s *server) error {
				if err := s.stop(faultlab.StopFast); err != nil {
					return err
				}
				return s.start(ctx)
			}},
		{name: "3s outage under load", steady: 9 * time.Second, needsOwn: true,
			during: func(ctx context.Context, s *server) error {
				if err := s.stop(faultlab.StopImmediate); err != nil {
					return err
				}
				time.Sleep(3 * time.Second)
				return s.start(ctx)
			}},
	}
}

func runPhase(ctx context.Context, ph phase, s *server, byName map[string]*sql.DB, order []string) ([]row, error) {
	pools := make([]*sql.DB, len(order))
	for i, name := range order {
		pools[i] = byName[name]
	}
	befores := make([]resilientpg.Stats, len(pools))
	for i, db := range pools {
		befores[i], _ = snapshot(db)
	}
	if ph.prepare != nil {
		if err := ph.prepare(ctx, s, pools); err != nil {
			return nil, err
		}
	}
	recs := make([]*recorder, len(order))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, db := range pools {
		recs[i] = &recorder{}
		wg.Go(func() {
			if ph.steady > 0 {
				steady(db, recs[i], 8, opTO, stop)
			} else {
				burst(db, recs[i], ph.n, ph.c, opTO)
			}
		})
	}
	done := make(chan struct{})
	go progress(ph.name, order, recs, done)
	var faultErr error
	if ph.steady > 0 {
		end := time.Now().Add(ph.steady)
		time.Sleep(2 * time.Second) // a steady state before the fault
		faultErr = ph.during(ctx, s)
		time.Sleep(time.Until(end))
		close(stop)
	}
	wg.Wait()
	close(done)
	if faultErr != nil {
		return nil, faultErr
	}
	rows := make([]row, len(order))
	for i, name := range order {
		rows[i] = row{phase: ph.name, driver: name, r: recs[i].result()}
		if after, ok := snapshot(pools[i]); ok {
			rows[i].account = accountOf(befores[i], after).String()
		}
	}
	return rows, nil
}

// progress keeps one status line on stderr while a phase runs; when stderr
// is not a terminal it prints the phase's final counts once instead.
func progress(name string, drivers []string, recs []*recorder, done <-chan struct{}) {
	line := func() string {
		l := fmt.Sprintf("%-40s", name)
		for i, d := range drivers {
			l += fmt.Sprintf("  %s %d ops %d failed", d, recs[i].count.Load(), recs[i].fails.Load())
		}
		return l
	}
	fi, err := os.Stderr.Stat()
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		<-done
		fmt.Fprintln(os.Stderr, line())
		return
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		fmt.Fprint(os.Stderr, "\r"+line()+"   ")
		select {
		case <-done:
			fmt.Fprint(os.Stderr, "\r"+line()+"   \n")
			return
		case <-t.C:
		}
	}
}
