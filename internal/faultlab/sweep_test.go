package faultlab

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// deadPid returns the pid of a process that has already exited.
func deadPid(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skipf("cannot run true: %v", err)
	}
	return cmd.Process.Pid
}

// fakeLabDir makes a lab directory owned (per its owner file) by pid.
func fakeLabDir(t *testing.T, pid int) string {
	t.Helper()
	dir, err := os.MkdirTemp("", labDirPrefix+"sweeptest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestSweepKeepsDirsOfLiveOwners(t *testing.T) {
	dir := fakeLabDir(t, os.Getpid())
	if err := sweepDir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("dir of a live owner was removed: %v", err)
	}
}

func TestSweepRemovesAbandonedDirAndItsServerOnly(t *testing.T) {
	dir := fakeLabDir(t, deadPid(t))
	// A "server" whose command line names the directory, like mariadbd's
	// --datadir, and an unrelated process that must survive.
	server := exec.Command("tail", "-f", filepath.Join(dir, ownerFile))
	bystander := exec.Command("sleep", "30")
	for _, c := range []*exec.Cmd{server, bystander} {
		if err := c.Start(); err != nil {
			t.Skipf("cannot start helper: %v", err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	}
	exited := make(chan struct{})
	go func() { server.Wait(); close(exited) }()
	if err := os.WriteFile(filepath.Join(dir, mariadbPidFile), []byte(strconv.Itoa(server.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sweepDir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("abandoned dir still there: %v", err)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the abandoned server was not killed")
	}

	// Now a pid file pointing at an unrelated live process.
	dir2 := fakeLabDir(t, deadPid(t))
	if err := os.WriteFile(filepath.Join(dir2, mariadbPidFile), []byte(strconv.Itoa(bystander.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sweepDir(dir2); err != nil {
		t.Fatal(err)
	}
	if !processAlive(bystander.Process.Pid) {
		t.Fatal("sweep killed a process unrelated to the lab dir")
	}
}
