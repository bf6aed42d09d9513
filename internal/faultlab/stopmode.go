package faultlab

import "fmt"

// StopMode says how brutally a server is stopped.
type StopMode int

const (
	// StopFast asks the server to shut down cleanly: PostgreSQL's
	// "pg_ctl -m fast" (clients are disconnected, then a checkpoint), or
	// SIGTERM for MariaDB. Clients see their connections closed by the peer.
	StopFast StopMode = iota
	// StopImmediate kills the server without a clean shutdown: PostgreSQL's
	// "pg_ctl -m immediate", or SIGKILL for MariaDB. The next start runs
	// crash recovery, like after a crash. Because faultlab turns
	// durability off for speed, commits from the last second or so before
	// an immediate stop may be lost.
	StopImmediate
)

// String returns the mode's name, for logs and test names.
func (m StopMode) String() string {
	switch m {
	case StopFast:
		return "fast"
	case StopImmediate:
		return "immediate"
	default:
		return fmt.Sprintf("StopMode(%d)", int(m))
	}
}
