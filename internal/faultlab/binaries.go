package faultlab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
)

// PostgresBinDir returns the directory holding initdb, pg_ctl and postgres.
// It prefers the newest /usr/lib/postgresql/<version>/bin (Debian's layout,
// where PATH usually has only client wrappers) and falls back to the
// directory of an initdb found on PATH.
func PostgresBinDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return pgVersionOf(dirs[i]) > pgVersionOf(dirs[j]) })
	for _, d := range dirs {
		if hasPostgresTools(d) {
			return d, nil
		}
	}
	if initdb, err := exec.LookPath("initdb"); err == nil {
		// Resolve symlinks (e.g. /usr/local/bin/initdb) so pg_ctl and
		// postgres are taken from the same installation.
		if real, err := filepath.EvalSymlinks(initdb); err == nil {
			initdb = real
		}
		if d := filepath.Dir(initdb); hasPostgresTools(d) {
			return d, nil
		}
	}
	return "", fmt.Errorf("%w: no directory with initdb, pg_ctl and postgres in /usr/lib/postgresql/*/bin or on PATH", ErrNotInstalled)
}

// pgVersionOf extracts the major version from /usr/lib/postgresql/N/bin
// so that 15 sorts above 9.6; unknown layouts sort last.
func pgVersionOf(binDir string) float64 {
	v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	if err != nil {
		return -1
	}
	return v
}

// hasPostgresTools reports whether dir holds every server tool we run.
func hasPostgresTools(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		if !isExecutable(filepath.Join(dir, name)) {
			return false
		}
	}
	return true
}

// MariaDBBins are the paths of the MariaDB programs faultlab runs.
type MariaDBBins struct {
	// Server is mariadbd, the server itself.
	Server string
	// InstallDB is mariadb-install-db, which creates a data directory.
	InstallDB string
}

// MariaDBBinaries finds mariadbd and mariadb-install-db on PATH or in the
// usual system directories (mariadbd lives in /usr/sbin, which is not on
// every user's PATH).
func MariaDBBinaries() (MariaDBBins, error) {
	server := findProgram("mariadbd", "/usr/sbin", "/usr/libexec", "/usr/local/mysql/bin", "/usr/local/sbin")
	install := findProgram("mariadb-install-db", "/usr/bin", "/usr/local/mysql/scripts", "/usr/local/mysql/bin", "/usr/local/bin")
	if server == "" || install == "" {
		return MariaDBBins{}, fmt.Errorf("%w: need mariadbd (found %q) and mariadb-install-db (found %q)", ErrNotInstalled, server, install)
	}
	return MariaDBBins{Server: server, InstallDB: install}, nil
}

// findProgram looks name up on PATH, then in each extra directory, and
// returns "" if it is nowhere.
func findProgram(name string, extraDirs ...string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, d := range extraDirs {
		if p := filepath.Join(d, name); isExecutable(p) {
			return p
		}
	}
	return ""
}

// isExecutable reports whether path is a regular file with an execute bit.
func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}
