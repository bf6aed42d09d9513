package resilientpg

import (
	"syscall"
	"time"
)

// tcpUserTimeout is TCP_USER_TIMEOUT from linux/tcp.h, which the syscall
// package does not define.
const tcpUserTimeout = 0x12

// userTimeoutSupported reports whether TCP_USER_TIMEOUT can be set here.
const userTimeoutSupported = true

// defaultUserTimeout: see tcp.go.
const defaultUserTimeout = 30 * time.Second

// userTimeoutControl sets TCP_USER_TIMEOUT on a socket before it
// connects, so that it bounds the connect too: the longest that sent data
// may stay unacknowledged before the kernel ends the connection with
// ETIMEDOUT.
func userTimeoutControl(d time.Duration) func(network, address string, c syscall.RawConn) error {
	ms := int(d / time.Millisecond)
	return func(network, _ string, c syscall.RawConn) error {
		if network != "tcp" && network != "tcp4" && network != "tcp6" {
			return nil // a Unix socket has no such option
		}
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpUserTimeout, ms)
		})
		if err != nil {
			return err
		}
		return serr
	}
}
