//go:build !unix

package resilientpg

import "os"

// fileID is what tells one version of a credentials file from another;
// without inodes, size and mtime.
type fileID struct{ size, mtime int64 }

func identity(fi os.FileInfo) fileID {
	return fileID{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
}
