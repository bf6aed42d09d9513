package resilientpg

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
}

// TestPasswordFileCache: read once, read again only when the file changes
// (content, size, mtime, or inode), trailing newlines trimmed.
func TestPasswordFileCache(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "password")
	s := &secretFile{key: keyPasswordFile, path: path}
	get := func(want string, wantCached bool) {
		t.Helper()
		v, cached, err := s.get(false)
		require.NoError(t, err)
		require.Equal(t, want, v)
		require.Equal(t, wantCached, cached, "cached")
	}
	writeFile(t, path, "pw1\n")
	get("pw1", false)
	get("pw1", true)
	require.EqualValues(t, 1, s.reads.Load())

	writeFile(t, path, "pw22\r\n") // another size
	get("pw22", false)
	get("pw22", true)

	// Same size, same inode: the mtime tells.
	stamp := time.Unix(1_700_000_000, 0)
	writeFile(t, path, "pw33\r\n")
	require.NoError(t, os.Chtimes(path, stamp, stamp))
	get("pw33", false)
	// Same size and mtime, but a new file renamed over it (an atomic
	// update): the inode tells.
	tmp := filepath.Join(dir, "tmp")
	writeFile(t, tmp, "pw44\r\n")
	require.NoError(t, os.Chtimes(tmp, stamp, stamp))
	require.NoError(t, os.Rename(tmp, path))
	get("pw44", false)
	get("pw44", true)

	// force reads even an unchanged file.
	v, cached, err := s.get(true)
	require.NoError(t, err)
	require.Equal(t, "pw44", v)
	require.False(t, cached)
	require.EqualValues(t, 5, s.reads.Load())
}

// TestPasswordFileKubernetesSwap: a secret volume is a symlink to
// ..data/password, and an update swaps the ..data symlink atomically to a
// new directory; the next connect must see the new password.
func TestPasswordFileKubernetesSwap(t *testing.T) {
	dir := t.TempDir()
	version := func(name, pw string) {
		require.NoError(t, os.Mkdir(filepath.Join(dir, name), 0o755))
		writeFile(t, filepath.Join(dir, name, "password"), pw)
	}
	version("..2025_01_01_00_00_00.1", "old-pw")
	require.NoError(t, os.Symlink("..2025_01_01_00_00_00.1", filepath.Join(dir, "..data")))
	require.NoError(t, os.Symlink("..data/password", filepath.Join(dir, "password")))
	s := &secretFile{key: keyPasswordFile, path: filepath.Join(dir, "password")}
	v, _, err := s.get(false)
	require.NoError(t, err)
	require.Equal(t, "old-pw", v)

	version("..2025_01_01_00_05_00.2", "new-pw") // same size, as rotated passwords usually are
	require.NoError(t, os.Symlink("..2025_01_01_00_05_00.2", filepath.Join(dir, "..data_tmp")))
	require.NoError(t, os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
	v, cached, err := s.get(false)
	require.NoError(t, err)
	require.Equal(t, "new-pw", v)
	require.False(t, cached)
}

// TestPasswordFileErrors: each failure names the key and the path, never
// the content, and a file that comes back is read again.
func TestPasswordFileErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "password")
	s := &secretFile{key: keyPasswordFile, path: path}
	check := func(name, want string, is error) {
		t.Helper()
		_, _, err := s.get(false)
		var ce *CredentialError
		require.ErrorAs(t, err, &ce, name)
		msg := err.Error()
		require.Equal(t, keyPasswordFile, ce.Source, name)
		require.Equal(t, path, ce.Path, name)
		require.Contains(t, msg, keyPasswordFile, name)
		require.Contains(t, msg, path, name)
		require.Contains(t, msg, want, name)
		require.NotContains(t, msg, "hunter2", name)
		if is != nil {
			require.ErrorIs(t, err, is, name)
		}
	}
	check("missing", "no such file", fs.ErrNotExist)
	writeFile(t, path, "")
	check("empty", "the file is empty", nil)
	writeFile(t, path, "\n")
	check("only a newline", "the file is empty", nil)
	writeFile(t, path, "hunter2"+strings.Repeat("x", maxSecretFile))
	check("too large", "not a credentials file", nil)
	require.NoError(t, os.Remove(path))
	require.NoError(t, os.Mkdir(path, 0o700))
	check("a directory", "not a regular file", nil)
	require.NoError(t, os.Remove(path))

	writeFile(t, path, "hunter2\n")
	v, _, err := s.get(false)
	require.NoError(t, err)
	require.Equal(t, "hunter2", v)
	require.NoError(t, os.Remove(path))
	check("removed after a good read", "no such file", fs.ErrNotExist)
}

// TestPasswordFileConnect: the files give each new connection its user
// and password; a rotation reaches the next connect without a refresh; a
// server rotated before the file refuses the forced re-read, at once and
// without closing the gate; a missing file fails the connect clearly.
func TestPasswordFileConnect(t *testing.T) {
	dir := t.TempDir()
	pwPath, userPath := filepath.Join(dir, "password"), filepath.Join(dir, "username")
	writeFile(t, pwPath, "pw1\n")
	writeFile(t, userPath, "v-app-1\n")
	c, s := newCredServer(opts(func(o *Options) { o.PasswordFile, o.UserFile = pwPath, userPath }), "pw1")
	ctx := context.Background()
	_, err := c.Connect(ctx)
	require.NoError(t, err)
	require.Equal(t, []string{"v-app-1:pw1"}, s.logins)

	// File first, then server: the next connect reads the new file.
	writeFile(t, pwPath, "pw2-longer\n")
	s.rotate("pw2-longer")
	_, err = c.Connect(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 0, c.creds.refreshes.Load())

	// Server first: refused, re-read once (still old), refused again.
	s.rotate("pw3-longest")
	before := c.gate.dials.Load()
	_, err = c.Connect(ctx)
	require.True(t, authRefused(err), "err %v", err)
	require.EqualValues(t, 2, c.gate.dials.Load()-before)
	require.EqualValues(t, 1, c.creds.refreshes.Load())
	require.Equal(t, ServerUp, c.Stats().Gate.State)
	// Then the file: fine again.
	writeFile(t, pwPath, "pw3-longest\n")
	_, err = c.Connect(ctx)
	require.NoError(t, err)

	require.NoError(t, os.Remove(userPath))
	_, err = c.Connect(ctx)
	var ce *CredentialError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, keyUserFile, ce.Source)
	require.NotContains(t, err.Error(), "pw3")
	require.Equal(t, ServerUp, c.Stats().Gate.State)
}

// TestPgxEnvironmentPerConnect: with no password in the DSN, each connect
// looks it up in PGPASSFILE again, as bare sql.Open("pgx", dsn) does; a
// password in the DSN stays; a broken environment fails the connect as a
// CredentialError.
func TestPgxEnvironmentPerConnect(t *testing.T) {
	passfile := filepath.Join(t.TempDir(), "pgpass")
	writeFile(t, passfile, "127.0.0.1:5432:db:app:pw1\n")
	t.Setenv("PGPASSFILE", passfile)
	t.Setenv("PGPASSWORD", "")
	hookPassword := func(dsn string) (string, error) {
		t.Helper()
		c, err := pgDriver.connector(dsn, DefaultOptions(), false)
		require.NoError(t, err)
		require.Nil(t, c.creds)
		cfg, err := pgx.ParseConfig(dsn)
		require.NoError(t, err)
		cfg.Password = "as parsed at Open"
		err = pgBeforeConnect(c, dsn)(context.Background(), cfg)
		return cfg.Password, err
	}
	const dsn = "postgres://app@127.0.0.1:5432/db?sslmode=disable&resilient_ping=always"
	pw, err := hookPassword(dsn)
	require.NoError(t, err)
	require.Equal(t, "pw1", pw)
	writeFile(t, passfile, "127.0.0.1:5432:db:app:pw2\n")
	pw, _ = hookPassword(dsn)
	require.Equal(t, "pw2", pw)
	t.Setenv("PGPASSWORD", "from-env")
	pw, _ = hookPassword(dsn)
	require.Equal(t, "from-env", pw)
	pw, _ = hookPassword("host=127.0.0.1 user=app dbname=db password=in-dsn")
	require.Equal(t, "in-dsn", pw)

	const envDSN = "postgres://app@127.0.0.1:5432/db" // sslmode from the environment
	c, err := pgDriver.connector(envDSN, DefaultOptions(), false)
	require.NoError(t, err)
	t.Setenv("PGSSLMODE", "sometimes")
	cfg, _ := pgx.ParseConfig("postgres://app@127.0.0.1/db?sslmode=disable")
	err = pgBeforeConnect(c, envDSN)(context.Background(), cfg)
	var ce *CredentialError
	require.ErrorAs(t, err, &ce)
	require.Contains(t, err.Error(), "PGPASSFILE")
	require.False(t, errors.Is(err, context.Canceled))
}
