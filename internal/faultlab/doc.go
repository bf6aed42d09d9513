// Package faultlab injects real faults into real database connections.
//
// It starts throwaway PostgreSQL and MariaDB servers from the binaries
// installed on the machine (each on its own free 127.0.0.1 port and in its
// own temporary directory) and offers a TCP proxy that can reset,
// black-hole, refuse or delay connections. Integration tests and demos use
// it to check how a client behaves when the database goes away, restarts,
// kills sessions or turns read-only, instead of trusting mocks.
//
// Everything here talks to 127.0.0.1 only, and every wait is bounded both in
// attempts and in time, so a broken server makes a test fail rather than
// hang.
package faultlab
