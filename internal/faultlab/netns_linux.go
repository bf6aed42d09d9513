package faultlab

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
)

const netnsSupported = true

// setnsSyscall is setns(2)'s number; package syscall does not export it,
// and golang.org/x/sys would be a dependency for one constant.
var setnsSyscall = map[string]uintptr{
	"amd64": 308, "arm64": 268, "riscv64": 268, "loong64": 268,
	"386": 346, "arm": 375, "ppc64le": 350, "s390x": 339,
}

// enterThread moves the calling OS thread into the namespace, so that the
// processes it starts from now on live there. The caller must have locked
// the goroutine to its thread and must never unlock it: the Go runtime
// then ends the thread with the goroutine instead of reusing it elsewhere
// in the wrong namespace.
func (n *Netns) enterThread() error {
	f, err := os.Open(filepath.Join("/run/netns", n.Name))
	if err != nil {
		return fmt.Errorf("faultlab: open namespace %s: %w", n.Name, err)
	}
	defer f.Close()
	nr, ok := setnsSyscall[runtime.GOARCH]
	if !ok {
		return fmt.Errorf("%w: setns number unknown on %s", ErrNoNetns, runtime.GOARCH)
	}
	if _, _, errno := syscall.RawSyscall(nr, f.Fd(), syscall.CLONE_NEWNET, 0); errno != 0 {
		return fmt.Errorf("faultlab: enter namespace %s: %w", n.Name, errno)
	}
	return nil
}

// inside runs f on a fresh OS thread inside the namespace (see
// enterThread); the thread is discarded afterwards.
func (n *Netns) inside(f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with us
		if err := n.enterThread(); err != nil {
			done <- err
			return
		}
		done <- f()
	}()
	return <-done
}
