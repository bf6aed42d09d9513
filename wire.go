package resilientpg

import (
	"encoding/binary"
	"errors"
	"net"
	"sync/atomic"
	"syscall"
)

// wireConn is the socket go-sql-driver/mysql reads and writes, as the
// wrapper's dial hook hands it over. The driver keeps both things the
// reaper needs to itself: the connection id the server sends in its
// greeting (it skips over it), and the kernel's error when a read or
// write fails (it logs it and returns ErrInvalidConn). wireConn reads the
// first from the greeting as it passes, and remembers whether the second
// said the path was dead. Past the greeting each call costs one branch.
type wireConn struct {
	net.Conn
	// Written by the connecting goroutine before Connect returns; read
	// after it (database/sql's locks order the two).
	greeting [96]byte
	got      int
	greeted  bool   // the id is known, or cannot be
	id       uint32 // the server's connection id; 0 unknown
	dead     atomic.Bool
}

func newWireConn(c net.Conn) *wireConn { return &wireConn{Conn: c} }

func (w *wireConn) Read(b []byte) (int, error) {
	n, err := w.Conn.Read(b)
	if !w.greeted {
		w.sniff(b[:n])
	}
	if err != nil && deadPathErr(err) {
		w.dead.Store(true)
	}
	return n, err
}

func (w *wireConn) Write(b []byte) (int, error) {
	n, err := w.Conn.Write(b)
	if err != nil && deadPathErr(err) {
		w.dead.Store(true)
	}
	return n, err
}

// SyscallConn lends the descriptor to the driver's own liveness check and
// the wrapper's socket peek, as the *net.TCPConn underneath would.
func (w *wireConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := w.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("resilientpg: the dialed connection has no descriptor")
	}
	return sc.SyscallConn()
}

// sniff collects the greeting's first bytes: a 4-byte packet header, the
// protocol version (10), the NUL-terminated server version, then the
// connection id, 4 bytes little-endian.
func (w *wireConn) sniff(b []byte) {
	w.got += copy(w.greeting[w.got:], b)
	id, done := parseGreeting(w.greeting[:w.got])
	if done || w.got == len(w.greeting) {
		w.id, w.greeted = id, true
	}
}

// parseGreeting returns the connection id of a MySQL protocol-10
// greeting, and whether b holds enough to say (an error packet, an other
// protocol or a too-long version string says 0, done).
func parseGreeting(b []byte) (uint32, bool) {
	const header = 4
	if len(b) < header+1 {
		return 0, false
	}
	if b[header] != 10 {
		return 0, true // an error packet (0xff) or an unknown protocol: no id
	}
	for i := header + 1; i < len(b); i++ {
		if b[i] == 0 {
			if len(b) < i+5 {
				return 0, false
			}
			return binary.LittleEndian.Uint32(b[i+1 : i+5]), true
		}
	}
	return 0, false
}

// deadPathErr reports whether err is the kernel saying that the path to
// the server is dead, rather than that the server closed or reset the
// connection: unacknowledged data or keepalive probes timed out (a TCP
// user timeout, a keepalive that gave up), or the host or network became
// unreachable. The server's session behind such a connection may live on.
func deadPathErr(err error) bool {
	return errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTDOWN) || errors.Is(err, syscall.ENETDOWN)
}
