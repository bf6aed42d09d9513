//go:build !linux

package faultlab

import "syscall"

// dieWithParent is a no-op where the kernel has no parent-death signal;
// the stale-directory sweep is then the only protection against leaks.
func dieWithParent(*syscall.SysProcAttr) {}
