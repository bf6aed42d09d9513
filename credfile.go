package resilientpg

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
)

// maxSecretFile bounds what a credentials file may hold: an RDS IAM token
// is under 2 KiB, a JWT a few; anything larger is the wrong file.
const maxSecretFile = 64 << 10

// secretFile is one credentials file (resilient_password_file,
// resilient_user_file). It is read again only when it changes: a stat per
// connect compares the file's identity (device, inode, size, mtime) with
// the one its value was read from. os.Stat follows symlinks, so the
// atomic swap of Kubernetes' ..data symlink shows up as another inode.
type secretFile struct {
	key, path string

	mu    sync.Mutex
	id    fileID // guarded by mu: identity of the file value came from
	value string // guarded by mu; "" = not read yet

	reads atomic.Int64
}

// get returns the file's content without its trailing newline, and
// whether it came from the cache. force reads it even if it looks the
// same, for the auth-failure refresh: a rewrite within one mtime tick
// that keeps the size and inode is invisible to the stat.
func (s *secretFile) get(force bool) (value string, cached bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fi, err := os.Stat(s.path)
	if err != nil {
		return "", false, s.fail(err)
	}
	if !fi.Mode().IsRegular() {
		return "", false, s.fail(errors.New("not a regular file")) // a FIFO would block the open
	}
	if !force && s.value != "" && identity(fi) == s.id {
		return s.value, true, nil
	}
	// The identity is taken from the open file, so that a swap between the
	// stat above and the open is seen at the next connect's stat.
	f, err := os.Open(s.path)
	if err != nil {
		return "", false, s.fail(err)
	}
	defer f.Close()
	fi, err = f.Stat()
	if err != nil {
		return "", false, s.fail(err)
	}
	if !fi.Mode().IsRegular() {
		return "", false, s.fail(errors.New("not a regular file"))
	}
	b, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return "", false, s.fail(err)
	}
	s.reads.Add(1)
	switch v := strings.TrimRight(string(b), "\r\n"); {
	case len(b) > maxSecretFile:
		return "", false, s.fail(fmt.Errorf("larger than %d bytes: not a credentials file", maxSecretFile))
	case v == "":
		return "", false, s.fail(errors.New("the file is empty"))
	default:
		s.id, s.value = identity(fi), v
		return v, false, nil
	}
}

// fail wraps a read error; the cached value is dropped, so that a file
// that comes back is read again whatever its identity. mu is held.
func (s *secretFile) fail(err error) error {
	s.value = ""
	return &CredentialError{Source: s.key, Path: s.path, Err: err}
}
