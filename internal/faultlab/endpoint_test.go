package faultlab

import (
	"io"
	"testing"
	"time"
)

// TestHAEndpointSwitchAndBlackhole moves an endpoint between two echo
// servers, established connections staying where they were, and
// black-holes it: a connect succeeds, nothing ever answers.
func TestHAEndpointSwitchAndBlackhole(t *testing.T) {
	a, b := startEcho(t), startEcho(t)
	e, err := NewEndpoint(a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	if err := e.SetTarget("10.0.0.1:5432"); err == nil {
		t.Fatal("SetTarget accepted a non-loopback address")
	}
	c1 := dial(t, e.Addr())
	roundTrip(t, c1, "one")
	if err := e.SetTarget(b); err != nil {
		t.Fatal(err)
	}
	c2 := dial(t, e.Addr())
	roundTrip(t, c2, "two")
	roundTrip(t, c1, "still one") // not moved
	if e.Target() != b || e.Accepted() != 2 {
		t.Fatalf("target %s, accepted %d; want %s, 2", e.Target(), e.Accepted(), b)
	}

	e.SetTarget("")
	c3 := dial(t, e.Addr())
	c3.Write([]byte("hello?"))
	c3.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c3.Read(make([]byte, 8)); !isTimeout(err) {
		t.Fatalf("black hole answered: %d bytes, %v", n, err)
	}
	if n := e.ResetAll(); n != 3 {
		t.Fatalf("ResetAll reset %d client connections, want 3", n)
	}
	c1.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c1.Read(make([]byte, 8)); !isResetOrEOF(err) && err != io.EOF {
		t.Fatalf("read after ResetAll: %v, want reset or EOF", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}
