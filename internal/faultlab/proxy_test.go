package faultlab

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestNewProxyRejectsNonLoopbackTargets(t *testing.T) {
	for _, target := range []string{
		"10.0.0.1:5432", "192.168.1.1:3306", "8.8.8.8:53", "example.com:80",
		"localhost:5432", "[::1]:5432", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999",
	} {
		if p, err := NewProxy(target); err == nil {
			p.Close()
			t.Errorf("NewProxy(%q) succeeded, want an error", target)
		}
	}
}

func TestProxyPassThrough(t *testing.T) {
	p := newProxy(t, startEcho(t))
	if !strings.HasPrefix(p.Addr(), "127.0.0.1:") || p.Port() == 0 {
		t.Fatalf("Addr() = %q, Port() = %d", p.Addr(), p.Port())
	}
	c := dial(t, p.Addr())
	for i := 0; i < 3; i++ {
		roundTrip(t, c, "hello through the proxy")
	}
	big := strings.Repeat("x", 1<<20) // several chunks, both ways
	roundTrip(t, c, big)
	if got := p.Accepted(); got != 1 {
		t.Errorf("Accepted() = %d, want 1", got)
	}
	if got := p.Active(); got != 1 {
		t.Errorf("Active() = %d, want 1", got)
	}
}

func TestProxyPropagatesClientClose(t *testing.T) {
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "x")
	// Half-close: the echo server sees EOF, closes, and we must see EOF.
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read after half-close = %v, want EOF", err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for p.Active() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := p.Active(); n != 0 {
		t.Fatalf("Active() = %d after both sides closed, want 0", n)
	}
}

func TestProxyResetAll(t *testing.T) {
	p := newProxy(t, startEcho(t))
	c1, c2 := dial(t, p.Addr()), dial(t, p.Addr())
	roundTrip(t, c1, "a")
	roundTrip(t, c2, "b")
	if n := p.ResetAll(); n != 2 {
		t.Fatalf("ResetAll() = %d, want 2", n)
	}
	start := time.Now()
	c1.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := c1.Read(make([]byte, 1))
	if !isResetOrEOF(err) {
		t.Fatalf("read after ResetAll = %v, want ECONNRESET or EOF", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("reset noticed after %v, want it at once", el)
	}
	t.Logf("client read after ResetAll: %v", err)
	// The proxy keeps working for new connections.
	roundTrip(t, dial(t, p.Addr()), "again")
}

func TestProxyBlackholeAll(t *testing.T) {
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "before")
	if n := p.BlackholeAll(); n != 1 {
		t.Fatalf("BlackholeAll() = %d, want 1", n)
	}
	if n := p.BlackholeAll(); n != 0 {
		t.Fatalf("second BlackholeAll() = %d, want 0", n)
	}
	// Writes still succeed (the proxy swallows them) but nothing returns,
	// and the connection is neither closed nor reset.
	if _, err := c.Write([]byte("into the void")); err != nil {
		t.Fatalf("write into black hole: %v", err)
	}
	for i := 0; i < 2; i++ {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
			t.Fatalf("read %d from black hole = %v, want a timeout", i, err)
		}
	}
	if got := p.Active(); got != 1 {
		t.Fatalf("Active() = %d, want the black-holed conn still held", got)
	}
	// Closing the client side must not leak to the server either, and new
	// connections are forwarded normally.
	c2 := dial(t, p.Addr())
	roundTrip(t, c2, "new conns still work")

	// Close finally closes the black-holed connection.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !isResetOrEOF(err) {
		t.Fatalf("read after Close = %v, want EOF", err)
	}
}

func TestProxyResetAllReachesBlackholed(t *testing.T) {
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "x")
	p.BlackholeAll()
	if n := p.ResetAll(); n != 1 {
		t.Fatalf("ResetAll() = %d, want 1", n)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !isResetOrEOF(err) {
		t.Fatalf("read = %v, want reset", err)
	}
}

func TestProxyRefuse(t *testing.T) {
	p := newProxy(t, startEcho(t))
	p.SetRefuse(true)
	for i := 0; i < 3; i++ {
		c, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
		if err != nil {
			continue // refused outright also counts
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Write([]byte("hi"))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if err == nil || isTimeout(err) {
			t.Fatalf("read on refused conn = %v, want reset or EOF", err)
		}
	}
	if got := p.Accepted(); got != 3 {
		t.Errorf("Accepted() = %d, want 3 (refused attempts count)", got)
	}
	p.SetRefuse(false)
	roundTrip(t, dial(t, p.Addr()), "accepted again")
}

func TestProxyTargetDownResetsClient(t *testing.T) {
	// Hold the target port while the proxy picks its own, so the two
	// differ, then free it so that nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := newProxy(t, ln.Addr().String())
	ln.Close()
	c, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
	if err == nil {
		// The reset can win the race with connect's completion, failing
		// the dial itself; otherwise the first read must see it.
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !isResetOrEOF(err) {
		t.Fatalf("got %v, want reset when the target is down", err)
	}
}

func TestProxyLatency(t *testing.T) {
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "warm-up")
	const d = 100 * time.Millisecond
	p.SetLatency(d)
	start := time.Now()
	roundTrip(t, c, "slow")
	// One delay each way.
	if el := time.Since(start); el < 2*d {
		t.Fatalf("round trip took %v, want at least %v", el, 2*d)
	}
	p.SetLatency(0)
	start = time.Now()
	roundTrip(t, c, "fast")
	if el := time.Since(start); el >= d {
		t.Fatalf("round trip without latency took %v", el)
	}
}

func TestProxyCloseIsIdempotentAndEndsConns(t *testing.T) {
	p, err := NewProxy(startEcho(t))
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, p.Addr())
	roundTrip(t, c, "x")
	p.SetLatency(time.Hour) // Close must interrupt the sleep
	c.Write([]byte("stuck in latency"))
	time.Sleep(20 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- p.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Fatal("dial after Close succeeded")
	}
}

// TestProxyConcurrentFaults hammers the proxy with traffic while faults
// are injected, mainly for the race detector, and checks Close still ends
// everything promptly.
func TestProxyConcurrentFaults(t *testing.T) {
	p, err := NewProxy(startEcho(t))
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	const clients = 6
	for i := 0; i < clients; i++ {
		go func() {
			defer func() { done <- struct{}{} }()
			buf := make([]byte, 64)
			for j := 0; j < 200; j++ {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
				if err != nil {
					continue
				}
				c.SetDeadline(time.Now().Add(100 * time.Millisecond))
				c.Write([]byte("ping"))
				c.Read(buf)
				c.Close()
			}
		}()
	}
	for i := 0; i < 30; i++ {
		switch i % 4 {
		case 0:
			p.ResetAll()
		case 1:
			p.BlackholeAll()
		case 2:
			p.SetLatency(time.Duration(i%3) * time.Millisecond)
		case 3:
			p.SetRefuse(i%8 == 3)
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	for i := 0; i < clients; i++ {
		<-done
	}
	closed := make(chan error, 1)
	go func() { closed <- p.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung")
	}
	if n := p.Active(); n != 0 {
		t.Fatalf("Active() = %d after Close", n)
	}
}
