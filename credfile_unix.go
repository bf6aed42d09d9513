//go:build unix

package resilientpg

import (
	"os"
	"syscall"
)

// fileID is what tells one version of a credentials file from another.
type fileID struct {
	dev, ino    uint64
	size, mtime int64
}

func identity(fi os.FileInfo) fileID {
	id := fileID{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok { // Dev and Ino differ in type between platforms
		id.dev, id.ino = uint64(st.Dev), uint64(st.Ino)
	}
	return id
}
