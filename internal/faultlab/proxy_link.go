package faultlab

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Directions of a link, indexing link.wmu.
const (
	toServer = 0
	toClient = 1
)

// link is one proxied connection: the accepted client side and the dialed
// server side, with two forwarding goroutines between them.
type link struct {
	proxy  *Proxy
	client *net.TCPConn

	// server and dead are guarded by proxy.mu. server is nil until the
	// dial succeeds; dead means the link was reset or closed from outside
	// and its goroutines must not close or re-track anything.
	server *net.TCPConn
	dead   bool

	blackholed atomic.Bool
	// wmu, one per direction, is held while checking blackholed and
	// writing. BlackholeAll takes it as a barrier, so once it returns no
	// chunk that slipped past the check can still be written.
	wmu [2]sync.Mutex
}

// serve dials the target and pumps bytes both ways until the link ends.
func (l *link) serve() {
	p := l.proxy
	defer p.wg.Done()
	d := net.Dialer{Timeout: dialTimeout}
	conn, err := d.DialContext(p.ctx, "tcp4", p.target)
	if err != nil {
		// Target down: the client sees a reset, as with a direct connect
		// to a closed port (modulo the successful handshake with us).
		l.abort()
		return
	}
	server := conn.(*net.TCPConn)
	p.mu.Lock()
	if l.dead {
		p.mu.Unlock()
		resetConn(server)
		return
	}
	l.server = server
	p.mu.Unlock()

	done := make(chan struct{})
	go func() {
		defer close(done)
		l.pipe(l.client, server, toServer)
	}()
	l.pipe(server, l.client, toClient)
	<-done

	// A black-holed link stays open, silently, until Close or ResetAll.
	if l.blackholed.Load() {
		return
	}
	if l.untrack() {
		l.client.Close()
		server.Close()
	}
}

// pipe copies src to dst until src ends. A clean EOF is passed on as a
// half-close, any other failure resets the whole link, and once the link
// is black-holed everything read is dropped and nothing is passed on.
func (l *link) pipe(src, dst *net.TCPConn, dir int) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !l.blackholed.Load() && !l.proxy.delay() {
				return // proxy closing
			}
			var werr error
			l.wmu[dir].Lock()
			if !l.blackholed.Load() {
				_, werr = dst.Write(buf[:n])
			}
			l.wmu[dir].Unlock()
			if werr != nil && !l.blackholed.Load() {
				l.abort()
				return
			}
		}
		if err != nil {
			switch {
			case l.blackholed.Load():
				// Drop the FIN or error too: the other side must not learn
				// anything.
			case errors.Is(err, io.EOF):
				dst.CloseWrite()
			default:
				l.abort()
			}
			return
		}
	}
}

// blackhole switches the link to dropping mode; it returns false if it
// already was. Pending writes are cut short with a past write deadline,
// which fails the write without closing the socket, and the per-direction
// locks are then taken once to wait for any write in flight.
func (l *link) blackhole() bool {
	if l.blackholed.Swap(true) {
		return false
	}
	p := l.proxy
	p.mu.Lock()
	server := l.server
	p.mu.Unlock()
	past := time.Unix(1, 0)
	l.client.SetWriteDeadline(past)
	if server != nil {
		server.SetWriteDeadline(past)
	}
	for i := range l.wmu {
		l.wmu[i].Lock()
		//lint:ignore SA2001 the empty critical section is the barrier
		l.wmu[i].Unlock()
	}
	return true
}

// untrack removes the link from the proxy; it returns false if someone
// else (ResetAll, Close, abort) already did and owns the closing.
func (l *link) untrack() bool {
	p := l.proxy
	p.mu.Lock()
	defer p.mu.Unlock()
	if l.dead {
		return false
	}
	l.dead = true
	delete(p.links, l)
	return true
}

// abort resets both sides after an error on either, mirroring what the
// client would see if the failure were on a direct connection.
func (l *link) abort() {
	if l.untrack() {
		l.reset()
	}
}

// reset sends RST on both sides. The caller must have untracked the link.
func (l *link) reset() {
	p := l.proxy
	p.mu.Lock()
	server := l.server
	p.mu.Unlock()
	resetConn(l.client)
	if server != nil {
		resetConn(server)
	}
}

// close closes both sides normally (FIN). The caller must have untracked
// the link.
func (l *link) close() {
	p := l.proxy
	p.mu.Lock()
	server := l.server
	p.mu.Unlock()
	l.client.Close()
	if server != nil {
		server.Close()
	}
}
