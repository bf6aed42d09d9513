package faultlab

import "syscall"

// dieWithParent makes the kernel SIGKILL a server we started directly if
// this process dies first (for example when go test times out and exits
// without running cleanups), so crashed test runs do not leak servers.
// The kernel ties this to the forking thread, hence startLockedThread.
func dieWithParent(attr *syscall.SysProcAttr) {
	attr.Pdeathsig = syscall.SIGKILL
}
