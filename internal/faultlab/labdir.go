package faultlab

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// ownerFile, inside every lab directory, holds the pid of the process that
// created it, so a later run can tell an abandoned directory (its owner is
// gone) from one still in use by a concurrent test binary.
const ownerFile = "faultlab.owner"

// labDirPrefix starts the name of every directory this package creates in
// the system temp dir; the stale sweep only ever looks at those.
const labDirPrefix = "faultlab-"

// newLabDir creates a fresh temporary directory named
// "faultlab-<kind>-*" owned by u. It lives in os.TempDir rather than a
// test's t.TempDir because the latter is private to root and the server
// account could not even reach it.
func newLabDir(kind string, u serverUser) (string, error) {
	dir, err := os.MkdirTemp("", labDirPrefix+kind+"-")
	if err != nil {
		return "", fmt.Errorf("faultlab: create temp dir: %w", err)
	}
	// MkdirTemp makes 0700 directories; the server account needs to enter
	// it, and the test process (possibly not the owner) needs to read logs.
	if err := os.Chmod(dir, 0o755); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("faultlab: chmod temp dir: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("faultlab: write owner file: %w", err)
	}
	if err := u.chownTree(dir); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("faultlab: chown temp dir to %s: %w", u.name, err)
	}
	return dir, nil
}
