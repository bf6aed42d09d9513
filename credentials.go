package resilientpg

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
)

// Credentials are the user and password of one new connection, as
// Options.Credentials returns them.
type Credentials struct {
	// User is the user to log in as; "" keeps the DSN's.
	User string
	// Password is the password or token; it must not be empty.
	Password string
	// Expires, if set, is when the password stops being accepted for new
	// logins (an RDS IAM token: 15 minutes after it was made). The result
	// is then reused for new connections until shortly before it, and each
	// connection made with it gets a max age that ends no later than it.
	// Zero: the function is called for every new connection (concurrent
	// connects share one call).
	Expires time.Time
}

// Credential sources, as CredentialError.Source names them.
const (
	sourceFunc = "Options.Credentials"
	sourceEnv  = "pgx environment (PGPASSWORD, PGPASSFILE, .pgpass)"
)

// CredentialError is the error of a connect whose credentials could not be
// had: Options.Credentials failed, or a resilient_password_file or
// resilient_user_file could not be read or was empty. Nothing was sent to
// the server, so it never counts as the server being down, and the connect
// fails at once. It names the source and the file, never their content.
type CredentialError struct {
	Source string // "Options.Credentials", or the DSN key of the file
	Path   string // the file, for the file keys
	Err    error  // what went wrong: the function's error, the file system's
}

func (e *CredentialError) Error() string {
	var b strings.Builder
	b.WriteString("resilientpg: connect: credentials from ")
	b.WriteString(e.Source)
	if e.Path != "" {
		b.WriteString(" (")
		b.WriteString(e.Path)
		b.WriteString(")")
	}
	b.WriteString(": ")
	if e.Err != nil {
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the underlying error, e.g. fs.ErrNotExist.
func (e *CredentialError) Unwrap() error { return e.Err }

func isCredentialErr(err error) bool {
	_, ok := asType[*CredentialError](err)
	return ok
}

// credSource is a connector's supply of credentials: the function, or the
// files. The driver hook asks it once per connect.
type credSource struct {
	fn         *credFunc
	user, pass *secretFile

	refreshes atomic.Int64 // connects retried with refreshed credentials after an auth failure
}

// newCredSource returns nil when o sets no source of credentials.
func newCredSource(o *Options) *credSource {
	switch {
	case o.Credentials != nil:
		return &credSource{fn: &credFunc{fn: o.Credentials, timeout: o.ConnectTimeout}}
	case o.PasswordFile != "":
		s := &credSource{pass: &secretFile{key: keyPasswordFile, path: o.PasswordFile}}
		if o.UserFile != "" {
			s.user = &secretFile{key: keyUserFile, path: o.UserFile}
		}
		return s
	}
	return nil
}

// credUse is one connect attempt's exchange with the driver hook, carried
// in the connect's context as dial lends mysql's socket.
type credUse struct {
	stale   uint64    // in: the function result this connect saw refused; 0 = none
	force   bool      // in: read the files again even if they look unchanged
	seq     uint64    // out: the function result used
	reused  bool      // out: the credentials were not fetched for this attempt (cache, or a call already running)
	expires time.Time // out: Credentials.Expires
}

type credKey struct{}

func credUseFrom(ctx context.Context) *credUse {
	if u, ok := ctx.Value(credKey{}).(*credUse); ok {
		return u
	}
	return &credUse{} // a connect that is not the wrapper's own: nothing to report back
}

// get returns the credentials for one connect attempt.
func (s *credSource) get(ctx context.Context, use *credUse) (Credentials, error) {
	if s.fn != nil {
		return s.fn.get(ctx, use)
	}
	pw, pwCached, err := s.pass.get(use.force)
	if err != nil {
		return Credentials{}, err
	}
	cr := Credentials{Password: pw}
	use.reused = pwCached
	if s.user != nil {
		u, uCached, err := s.user.get(use.force)
		if err != nil {
			return Credentials{}, err
		}
		cr.User = u
		use.reused = use.reused || uCached
	}
	return cr, nil
}

// authRefused reports whether a connect failed because the server refused
// the credentials: the one failure a refresh can cure. 3D000 and 1049
// (no such database) are auth errors too, but new credentials do not help.
func authRefused(err error) bool {
	if code, ok := asPgError(err); ok {
		return code == "28P01" || code == "28000" // invalid_password, invalid_authorization_specification
	}
	if n, ok := asMySQLNumber(err); ok {
		return n == 1045 || n == 1698 // ER_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR
	}
	return false
}

// pgBeforeConnect is the pgx hook that gives each new connection its
// credentials. With no source configured it does what bare
// sql.Open("pgx", dsn) does by parsing the DSN at every connect: the
// password is looked up again, so a changed PGPASSWORD, PGPASSFILE or
// .pgpass reaches new connections. Only the password is taken; the rest
// of the configuration stays as parsed at Open. pgx v5 keeps one password
// for every host of a multi-host DSN (FallbackConfig has none), so setting
// it covers them all.
func pgBeforeConnect(c *Connector, dsn string) func(context.Context, *pgx.ConnConfig) error {
	return func(ctx context.Context, cfg *pgx.ConnConfig) error {
		if c.creds == nil {
			fresh, err := pgx.ParseConfig(dsn) // resilient_ keys land in RuntimeParams, unused here
			if err != nil {
				return &CredentialError{Source: sourceEnv, Err: err} // pgconn's ParseConfigError redacts the password
			}
			cfg.Password = fresh.Password
			return nil
		}
		use := credUseFrom(ctx)
		cr, err := c.creds.get(ctx, use)
		if err != nil {
			return err
		}
		if cr.User != "" {
			cfg.User = cr.User
		}
		cfg.Password = cr.Password
		use.expires = cr.Expires
		return nil
	}
}

// mysqlBeforeConnect is the go-sql-driver/mysql hook; the driver runs it
// on a copy of the config for each new connection.
func mysqlBeforeConnect(c *Connector) func(context.Context, *mysql.Config) error {
	return func(ctx context.Context, cfg *mysql.Config) error {
		use := credUseFrom(ctx)
		cr, err := c.creds.get(ctx, use)
		if err != nil {
			return err
		}
		if cr.User != "" {
			cfg.User = cr.User
		}
		cfg.Passwd = cr.Password
		use.expires = cr.Expires
		return nil
	}
}

// Reuse margin: a result with Expires is reused until min(reuseMargin,
// reuseShare of its remaining life at fetch) before it. The password must
// still be valid when the server checks it, which is moments after the
// cache hands it out (a connect takes milliseconds, and at most
// resilient_connect_timeout), plus whatever clock skew lies between this
// host and the token's issuer: a minute covers both with room to spare.
// For short-lived tokens the share keeps most of their life usable: an
// RDS IAM token (15 min) is reused for 14 min, a 30 s token for 27 s.
const (
	reuseMargin = time.Minute
	reuseShare  = 10 // percent
)

func reuseUntil(fetched, expires time.Time) time.Time {
	margin := min(reuseMargin, expires.Sub(fetched)*reuseShare/100)
	return expires.Add(-max(margin, 0))
}

// credFunc calls Options.Credentials, one call at a time shared by every
// connect that asks meanwhile (single-flight), and reuses a result that
// carries Expires until shortly before it.
type credFunc struct {
	fn      func(context.Context) (Credentials, error)
	timeout time.Duration // each call's bound: ConnectTimeout

	mu   sync.Mutex
	last *credFlight // the newest call, finished or running; guarded by mu
	seq  uint64      // guarded by mu

	calls atomic.Int64
}

// credFlight is one call of the function. Its result fields are written
// before done is closed and read only after.
type credFlight struct {
	seq     uint64
	done    chan struct{}
	running bool      // guarded by credFunc.mu
	until   time.Time // guarded by credFunc.mu: reusable until then; zero: not at all
	cr      Credentials
	err     error
}

// get returns the function's credentials for one connect attempt: the
// newest result if it may be reused and the attempt did not see it
// refused, else the running call's, else a new call's.
func (f *credFunc) get(ctx context.Context, use *credUse) (Credentials, error) {
	f.mu.Lock()
	fl := f.last
	fresh := fl == nil || fl.seq <= use.stale ||
		(!fl.running && (fl.err != nil || !time.Now().Before(fl.until)))
	if fresh {
		f.seq++
		fl = &credFlight{seq: f.seq, done: make(chan struct{}), running: true}
		f.last = fl
		// The call runs on its own goroutine, detached from this caller's
		// cancellation, so that a caller giving up does not fail the
		// others waiting for the same call; each waits within its own ctx.
		go f.run(context.WithoutCancel(ctx), fl)
	}
	f.mu.Unlock()
	use.seq, use.reused = fl.seq, !fresh
	select {
	case <-fl.done:
	case <-ctx.Done():
		return Credentials{}, &CredentialError{Source: sourceFunc, Err: context.Cause(ctx)}
	}
	return fl.cr, fl.err
}

// run makes one call, bounded by the connect timeout even when the
// connect that started it had no deadline.
func (f *credFunc) run(ctx context.Context, fl *credFlight) {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	f.calls.Add(1)
	cr, err := f.fn(ctx)
	switch {
	case err != nil:
		err = &CredentialError{Source: sourceFunc, Err: err}
	case cr.Password == "":
		err = &CredentialError{Source: sourceFunc, Err: errors.New("returned an empty Password")}
	}
	if err != nil {
		cr = Credentials{}
	}
	fl.cr, fl.err = cr, err
	f.mu.Lock()
	fl.running = false
	if err == nil && !cr.Expires.IsZero() {
		fl.until = reuseUntil(time.Now(), cr.Expires)
	}
	f.mu.Unlock()
	close(fl.done)
}
