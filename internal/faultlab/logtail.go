package faultlab

import (
	"fmt"
	"io"
	"os"
	"strings"
)

// logTailBytes is how much of a server log goes into a start error: enough
// for the FATAL line and its context, small enough to read in test output.
const logTailBytes = 4096

// tailFile returns the last logTailBytes of path, or a note saying why it
// could not be read. It never fails, because it is only used to enrich
// another error.
func tailFile(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log at %s: %v)", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Sprintf("(cannot stat %s: %v)", path, err)
	}
	off := st.Size() - logTailBytes
	if off < 0 {
		off = 0
	}
	buf := make([]byte, st.Size()-off)
	n, err := f.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	return strings.TrimSpace(string(buf[:n]))
}

// withLog appends the tail of a server log to err, so a failed start
// explains itself without anyone having to find the temp directory.
func withLog(err error, path string) error {
	return fmt.Errorf("%w\n--- tail of %s ---\n%s", err, path, tailFile(path))
}
