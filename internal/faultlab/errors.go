package faultlab

import "errors"

// ErrNotInstalled is wrapped by the binary lookups (and so by the Start
// functions) when a server is not installed, letting tests tell "skip:
// not installed" apart from a real failure to start.
var ErrNotInstalled = errors.New("faultlab: database server binaries not installed")

// ErrClosed is returned by lifecycle methods called after Close, when the
// data directory no longer exists.
var ErrClosed = errors.New("faultlab: server already closed")
