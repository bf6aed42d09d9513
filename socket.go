//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package resilientpg

import (
	"crypto/tls"
	"net"
	"syscall"
)

// sockState is what a look at an idle socket tells without a round trip.
type sockState uint8

const (
	sockAlive    sockState = iota // nothing to read: open as far as the kernel knows
	sockPending                   // bytes are waiting: maybe a notification, maybe a farewell
	sockFatal                     // the server sent a PostgreSQL ErrorResponse while idle
	sockClosed                    // EOF or a socket error: the peer closed or reset it
	sockDeadPath                  // the kernel gave up on the path (keepalive or user timeout, unreachable): the server may not know
)

// sockCheck peeks at an idle connection's socket with a non-blocking
// MSG_PEEK read. Unlike go-sql-driver/mysql's check it does not consume the
// byte, so a pending LISTEN notification stays readable for pgx and the
// connection is pinged instead of discarded. It is built once per connection
// and reused, so a check allocates nothing.
type sockCheck struct {
	raw       syscall.RawConn
	plaintext bool // bytes are the protocol's own, not TLS records
	mysql     bool // the MySQL protocol: a server never sends an idle client anything but a farewell
	buf       [1]byte
	state     sockState
	fn        func(fd uintptr) // s.peek bound once; a fresh closure per call would allocate
}

// newSockCheck returns a check for c, or nil when c does not expose its
// file descriptor (a user's AfterNetConnect wrapper, say).
func newSockCheck(c net.Conn) *sockCheck {
	plaintext := true
	if tc, ok := c.(*tls.Conn); ok {
		c, plaintext = tc.NetConn(), false
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &sockCheck{raw: raw, plaintext: plaintext}
	s.fn = s.peek
	return s
}

// check reports the socket's state. Only call it while the connection is
// idle and owned by the caller (database/sql's driverConn lock).
//
// It runs under RawConn.Control, which pins the descriptor against close
// but takes no read lock: pgconn may leave a background reader goroutine
// parked in Read on an idle connection (after a write slower than 15 ms),
// and RawConn.Read would wait for that reader, that is for the server to
// send something, forever. A non-blocking peek needs no lock.
func (s *sockCheck) check() sockState {
	if err := s.raw.Control(s.fn); err != nil {
		return sockClosed // the descriptor is already closed
	}
	return s.state
}

// peek runs inside RawConn.Control.
func (s *sockCheck) peek(fd uintptr) {
	n, _, err := syscall.Recvfrom(int(fd), s.buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	switch {
	case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK:
		s.state = sockAlive
	case err == syscall.EINTR:
		s.state = sockPending // unknown: let the ping decide
	case err != nil && deadPathErr(err):
		s.state = sockDeadPath
	case err != nil, n == 0:
		s.state = sockClosed
	case s.plaintext && (s.mysql || s.buf[0] == 'E'):
		// An idle PostgreSQL backend sends an ErrorResponse only when it is
		// about to end the session (pg_terminate_backend, shutdown, idle
		// timeouts); a MySQL server sends an idle client nothing but an
		// error before it closes: discard without a ping.
		s.state = sockFatal
	default:
		s.state = sockPending
	}
}

// peekOther looks at the socket of a connection another goroutine may own,
// with a check of its own: the peek neither consumes nor changes anything,
// but the owner's sockCheck must not be shared.
func (s *sockCheck) peekOther() sockState {
	o := &sockCheck{raw: s.raw, plaintext: s.plaintext, mysql: s.mysql}
	o.fn = o.peek
	return o.check()
}
