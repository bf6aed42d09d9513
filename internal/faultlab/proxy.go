package faultlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy is a TCP proxy on 127.0.0.1 that sits between a client and a
// database and breaks the connections on demand: reset them, black-hole
// them, refuse new ones, or slow them down. Unlike stopping the server, it
// faults the network path only, the way a load balancer, NAT or flaky link
// would. Its methods are safe for concurrent use.
type Proxy struct {
	target string
	ln     *net.TCPListener

	// ctx ends at Close; it interrupts dials and latency sleeps.
	ctx    context.Context
	cancel context.CancelFunc
	// wg counts every goroutine the proxy starts, so Close can wait for
	// all of them and tests can check nothing leaks.
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error

	refuse   atomic.Bool
	latency  atomic.Int64 // time.Duration
	accepted atomic.Int64

	mu     sync.Mutex
	links  map[*link]struct{}
	closed bool
}

// dialTimeout bounds the proxy's own connect to the target, so a dead
// target shows up to the client as a reset, not as a hang.
const dialTimeout = 5 * time.Second

// NewProxy listens on 127.0.0.1 on a free port and forwards every accepted
// connection to target, which must be an IPv4 loopback address such as
// Postgres.Addr(); anything else is rejected so faults can never be
// pointed off the machine. Call Close when done.
func NewProxy(target string) (*Proxy, error) {
	if err := checkLoopback(target); err != nil {
		return nil, err
	}
	ln, err := listenNotOn(target)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{target: target, ln: ln, ctx: ctx, cancel: cancel, links: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// listenNotOn listens on a free 127.0.0.1 port other than target's. The
// kernel may hand out a port that a stopped target just released, and a
// proxy forwarding to itself would loop; the first listener is held while
// asking again so the second port must differ.
func listenNotOn(target string) (*net.TCPListener, error) {
	laddr := &net.TCPAddr{IP: net.ParseIP(loopbackHost)}
	ln, err := net.ListenTCP("tcp4", laddr)
	if err != nil {
		return nil, fmt.Errorf("faultlab: proxy listen: %w", err)
	}
	if ln.Addr().String() != target {
		return ln, nil
	}
	defer ln.Close()
	ln2, err := net.ListenTCP("tcp4", laddr)
	if err != nil {
		return nil, fmt.Errorf("faultlab: proxy listen: %w", err)
	}
	return ln2, nil
}

// Addr returns the proxy's listen address, "127.0.0.1:PORT"; point clients
// here instead of at the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Port returns the proxy's listen port, for DSNs built from host and port.
func (p *Proxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// Accepted returns how many connections the proxy has accepted so far,
// refused ones included, which makes it a counter of the client's connect
// attempts (e.g. to check a retry or pool policy).
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

// Active returns how many connections the proxy currently holds, including
// black-holed ones.
func (p *Proxy) Active() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// SetRefuse makes the proxy reset every new connection right after
// accepting it while on is true, like a port whose server is down: the
// client's connect may succeed, but its first read or write fails with
// ECONNRESET. Existing connections are not affected.
func (p *Proxy) SetRefuse(on bool) { p.refuse.Store(on) }

// SetLatency delays every chunk of data by d before forwarding it, in both
// directions, on current and future connections. Chunks of one direction
// are delayed one after another, so a burst pays d per read, not once.
// Zero (or negative) turns the delay off.
func (p *Proxy) SetLatency(d time.Duration) { p.latency.Store(int64(d)) }

// ResetAll aborts every current connection with a TCP RST on both sides
// (SO_LINGER 0, then close) and returns how many it reset. Clients see
// ECONNRESET (or EOF, if they were already reading a closed stream) on
// their next read or write. New connections still work.
func (p *Proxy) ResetAll() int {
	p.mu.Lock()
	links := p.takeLinksLocked()
	p.mu.Unlock()
	for _, l := range links {
		l.reset()
	}
	return len(links)
}

// BlackholeAll silently stops forwarding on every current connection,
// both ways, without closing anything: no FIN, no RST, until Close or
// ResetAll. Bytes the client sends are still read (so its writes succeed)
// and thrown away, and nothing ever comes back, as when a NAT or load
// balancer drops a flow. Only a client-side timeout or keepalive can
// detect it. New connections are forwarded normally. It returns how many
// connections it black-holed that were not already.
func (p *Proxy) BlackholeAll() int {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	n := 0
	for _, l := range links {
		if l.blackhole() {
			n++
		}
	}
	return n
}

// Close stops listening, closes every connection and waits for all of the
// proxy's goroutines to exit. It is idempotent.
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.cancel()
		p.closeErr = p.ln.Close()
		p.mu.Lock()
		p.closed = true
		links := p.takeLinksLocked()
		p.mu.Unlock()
		for _, l := range links {
			l.close()
		}
		p.wg.Wait()
	})
	return p.closeErr
}

// takeLinksLocked removes and returns every tracked link, marking each one
// dead so its goroutines stop touching it. Caller holds p.mu.
func (p *Proxy) takeLinksLocked() []*link {
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		l.dead = true
		delete(p.links, l)
		links = append(links, l)
	}
	return links
}

// acceptLoop accepts until Close; it is bounded by the proxy's lifetime.
func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || p.ctx.Err() != nil {
				return
			}
			// Transient (e.g. out of file descriptors): back off briefly
			// instead of spinning.
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		p.accepted.Add(1)
		if p.refuse.Load() {
			resetConn(c)
			continue
		}
		l := &link{proxy: p, client: c}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			resetConn(c)
			return
		}
		// Tracked before dialing, so ResetAll and BlackholeAll also reach
		// connections whose upstream dial is still in progress.
		p.links[l] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(1)
		go l.serve()
	}
}

// delay sleeps for the configured latency; it returns false if the proxy
// closed meanwhile.
func (p *Proxy) delay() bool {
	d := time.Duration(p.latency.Load())
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// resetConn closes c with SO_LINGER 0, which makes the kernel send RST
// instead of FIN.
func resetConn(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}
