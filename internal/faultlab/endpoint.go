package faultlab

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Endpoint is a TCP address on 127.0.0.1 whose target can be moved, like a
// cloud database's writer endpoint or a DNS name that follows a failover:
// new connections go to the current target, established ones stay with the
// server they reached (as after a DNS change). With no target it is a black
// hole: it accepts connections and never answers, like a host whose
// packets are dropped, so a client's connect hangs until its own timeout.
// Proxy, by contrast, keeps its target and faults connections already made.
// Its methods are safe for concurrent use.
type Endpoint struct {
	ln       *net.TCPListener
	target   atomic.Value // string; "" means black hole
	accepted atomic.Int64

	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[*net.TCPConn]bool // true for the client side
	closed bool
}

// NewEndpoint listens on a free 127.0.0.1 port and forwards to target, an
// IPv4 loopback address, or black-holes when target is "". Call Close when
// done.
func NewEndpoint(target string) (*Endpoint, error) {
	if target != "" {
		if err := checkLoopback(target); err != nil {
			return nil, err
		}
	}
	ln, err := listenNotOn(target)
	if err != nil {
		return nil, err
	}
	e := &Endpoint{ln: ln, conns: map[*net.TCPConn]bool{}}
	e.target.Store(target)
	e.wg.Add(1)
	go e.acceptLoop()
	return e, nil
}

// Addr returns "127.0.0.1:PORT".
func (e *Endpoint) Addr() string { return e.ln.Addr().String() }

// Port returns the listen port.
func (e *Endpoint) Port() int { return e.ln.Addr().(*net.TCPAddr).Port }

// Accepted counts the connections accepted so far.
func (e *Endpoint) Accepted() int64 { return e.accepted.Load() }

// Target returns where new connections go, "" for the black hole.
func (e *Endpoint) Target() string { return e.target.Load().(string) }

// SetTarget moves the endpoint: connections accepted from now on go to
// target ("" black-holes them). Established connections are untouched.
func (e *Endpoint) SetTarget(target string) error {
	if target != "" {
		if err := checkLoopback(target); err != nil {
			return err
		}
		if target == e.Addr() {
			return fmt.Errorf("faultlab: endpoint %s cannot forward to itself", target)
		}
	}
	e.target.Store(target)
	return nil
}

// ResetAll aborts every connection with RST, both sides, and returns how
// many client connections it reset.
func (e *Endpoint) ResetAll() int {
	e.mu.Lock()
	n := 0
	for c, client := range e.conns {
		resetConn(c)
		delete(e.conns, c)
		if client {
			n++
		}
	}
	e.mu.Unlock()
	return n
}

// Close stops listening, closes every connection and waits for the
// endpoint's goroutines. It is idempotent.
func (e *Endpoint) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	err := e.ln.Close()
	for c := range e.conns {
		c.Close()
		delete(e.conns, c)
	}
	e.mu.Unlock()
	e.wg.Wait()
	return err
}

// track registers c so Close and ResetAll reach it; false if closing.
func (e *Endpoint) track(c *net.TCPConn, client bool) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	e.conns[c] = client
	return true
}

func (e *Endpoint) untrack(c *net.TCPConn) {
	e.mu.Lock()
	delete(e.conns, c)
	e.mu.Unlock()
	c.Close()
}

func (e *Endpoint) acceptLoop() {
	defer e.wg.Done()
	for {
		c, err := e.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // transient; Close ends the loop
		}
		e.accepted.Add(1)
		if !e.track(c, true) {
			resetConn(c)
			return
		}
		e.wg.Add(1)
		go e.serve(c, e.Target())
	}
}

// serve forwards c to target, or swallows its bytes when target is "".
func (e *Endpoint) serve(client *net.TCPConn, target string) {
	defer e.wg.Done()
	defer e.untrack(client)
	if target == "" {
		io.Copy(io.Discard, client) // until the client or Close ends it
		return
	}
	d := net.Dialer{Timeout: dialTimeout}
	conn, err := d.Dial("tcp4", target)
	if err != nil {
		resetConn(client) // as a refused port would look through a proxy
		return
	}
	server := conn.(*net.TCPConn)
	if !e.track(server, false) {
		resetConn(server)
		return
	}
	defer e.untrack(server)
	// Whichever side ends first ends both: database protocols have no use
	// for half-closed connections.
	done := make(chan struct{})
	go func() {
		io.Copy(server, client)
		server.Close()
		client.Close()
		close(done)
	}()
	io.Copy(client, server)
	client.Close()
	server.Close()
	<-done
}
