//go:build !(linux || darwin || dragonfly || freebsd || netbsd || openbsd)

package resilientpg

import "net"

type sockState uint8

const (
	sockAlive sockState = iota
	sockPending
	sockFatal
	sockClosed
	sockDeadPath
)

// sockCheck is unavailable on this platform: checkouts rely on the ping
// policy alone.
type sockCheck struct{ plaintext, mysql bool }

func newSockCheck(net.Conn) *sockCheck { return nil }

func (*sockCheck) check() sockState { return sockAlive }

func (*sockCheck) peekOther() sockState { return sockAlive }
