package faultlab

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// serverUser is the OS account a database server runs as. PostgreSQL
// refuses to run as root and MariaDB needs to be told which user to become,
// so when this process is root the servers run as their own service
// account; otherwise they run as the current user, which then owns
// everything anyway.
type serverUser struct {
	name     string
	uid, gid uint32
	// switchTo is true when commands must change credentials, i.e. when
	// this process runs as root.
	switchTo bool
}

// lookupServerUser returns the account to run a server as: name (for
// example "postgres") when running as root, the current user otherwise.
func lookupServerUser(name string) (serverUser, error) {
	if os.Geteuid() != 0 {
		return serverUser{name: "current user", uid: uint32(os.Geteuid()), gid: uint32(os.Getegid())}, nil
	}
	u, err := user.Lookup(name)
	if err != nil {
		return serverUser{}, fmt.Errorf("faultlab: running as root, so the server must run as OS user %q: %w", name, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return serverUser{}, fmt.Errorf("faultlab: uid of %q: %w", name, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return serverUser{}, fmt.Errorf("faultlab: gid of %q: %w", name, err)
	}
	return serverUser{name: name, uid: uint32(uid), gid: uint32(gid), switchTo: true}, nil
}

// command builds a command that runs as u in dir. The environment is
// this process's minus PG* and MYSQL* variables, which would otherwise
// silently redirect the tools (PGDATA, PGPORT, MYSQL_HOME, ...).
// The command is killed when ctx ends; long-lived server processes pass
// context.Background because they must outlive the call that starts them.
func (u serverUser) command(ctx context.Context, dir, path string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Dir = dir
	cmd.Env = cleanEnv(os.Environ())
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if u.switchTo {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: u.uid, Gid: u.gid}
	}
	return cmd
}

// cleanEnv drops variables that the database tools read as configuration.
func cleanEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "MYSQL") || strings.HasPrefix(kv, "MARIADB") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// chownTree gives u everything under root, because the server must own its
// data directory. It does nothing when no user switch happens.
func (u serverUser) chownTree(root string) error {
	if !u.switchTo {
		return nil
	}
	return filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, int(u.uid), int(u.gid))
	})
}
