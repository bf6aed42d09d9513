//go:build !linux

package resilientpg

import (
	"syscall"
	"time"
)

// userTimeoutSupported: TCP_USER_TIMEOUT is Linux's; elsewhere
// resilient_tcp_user_timeout must stay 0 (validate says so).
const userTimeoutSupported = false

const defaultUserTimeout = 0

func userTimeoutControl(time.Duration) func(network, address string, c syscall.RawConn) error {
	return nil
}
