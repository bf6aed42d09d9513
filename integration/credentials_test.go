package integration

import (
	"context"
	"database/sql"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/resilientpg/resilientpg"
)

const (
	credWorkers      = 8
	credOpsPerWorker = 200000 // a bound; the run's duration ends it first
	credOpTimeout    = 5 * time.Second
	credStepPause    = 300 * time.Millisecond // between the steps of a rotation, under load
)

// TestCredentials runs the credential rotation scenarios against throwaway
// PostgreSQL (scram-sha-256) and MariaDB servers with real password
// authentication, under a load of 8 workers.
func TestCredentials(t *testing.T) {
	for _, engine := range []string{"postgres", "mysql"} {
		t.Run(engine, func(t *testing.T) {
			lab := startAuthLab(t, engine)
			t.Run("rotation/file-first", func(t *testing.T) { credRotation(t, lab, false) })
			t.Run("rotation/server-first", func(t *testing.T) { credRotation(t, lab, true) })
			t.Run("function", func(t *testing.T) { credFunction(t, lab) })
			t.Run("token-rollover", func(t *testing.T) { credRollover(t, lab) })
			t.Run("revocation", func(t *testing.T) { credRevocation(t, lab) })
			t.Run("errors", func(t *testing.T) { credErrors(t, lab) })
			if engine == "postgres" {
				t.Run("pgpassfile", func(t *testing.T) { credPgpassfile(t, lab) })
				t.Run("keyword-dsn", func(t *testing.T) { credKeywordDSN(t, lab) })
			}
		})
	}
}

// credRotation: the password changes on the server and in the file, in
// either order, and then every session is ended: no operation fails, the
// new sessions log in with the new password, and the old one is refused.
// Nothing connects between the two steps (the pool is full and healthy),
// which is what makes either order safe.
func credRotation(t *testing.T, lab *authLab, serverFirst bool) {
	ctx := ctxT(t, 2*time.Minute)
	user := "rot_file_first"
	if serverFirst {
		user = "rot_server_first"
	}
	pw1, pw2 := secret("old"), secret("new")
	must(t, lab.createUser(ctx, user, pw1))
	vol := newSecretVolume(t, map[string]string{"password": pw1})
	db := openDB(t, lab.driver, lab.dsn(user, "", fileKey("resilient_password_file", vol.path("password"))))
	l := startCredLoad(t, db, lab.idQuery)

	steps := []func(){
		func() { vol.update(t, map[string]string{"password": pw2}) },
		func() { must(t, lab.setPassword(ctx, user, pw2)) },
	}
	if serverFirst {
		steps[0], steps[1] = steps[1], steps[0]
	}
	for _, step := range steps {
		step()
		time.Sleep(credStepPause)
	}
	old := l.sessions(time.Since(l.start))
	killedAt := time.Since(l.start)
	n, err := lab.killUser(ctx, user)
	must(t, err)
	killed := time.Since(l.start)
	time.Sleep(1500 * time.Millisecond)
	ops := l.stopAndWait(t)

	r := analyse(ops, old, killedAt, killed)
	st, _ := resilientpg.StatsOf(db)
	t.Logf("%s, %s first: %d ops (%.0f/s), %d FAILED; %d sessions before, %d killed in %v; %d new sessions, the first answering %v after the kill began; after it: %d ops, %d on old sessions, slowest %v; connects %d, auth refusals %d",
		lab.name, map[bool]string{false: "file", true: "server"}[serverFirst], len(ops), float64(len(ops))/ops[len(ops)-1].end.Seconds(),
		r.failed, len(old), n, (killed - killedAt).Round(time.Millisecond), r.newSessions, r.firstNew.Round(100*time.Microsecond),
		r.after, r.afterOnOld, r.slowestAfter.Round(time.Millisecond), st.ConnectAttempts, st.ConnectFailures[resilientpg.ClassAuth])
	if r.failed != 0 {
		t.Errorf("%d operations failed, want 0; first errors: %q", r.failed, r.errs)
	}
	if a := st.ConnectFailures[resilientpg.ClassAuth]; a != 0 {
		t.Errorf("%d connects refused: the changed file was not seen by its stat, only by the refresh after a refusal", a)
	}
	if len(old) != credWorkers || n < len(old) {
		t.Errorf("%d sessions before the kill, %d killed; want the pool's %d", len(old), n, credWorkers)
	}
	if r.after == 0 || r.newSessions == 0 || r.afterOnOld != 0 {
		t.Errorf("after the kill: %d ops, %d new sessions, %d ops on killed ones; want ops on new sessions only", r.after, r.newSessions, r.afterOnOld)
	}
	if err := lab.loginWith(ctx, user, pw1); !lab.refused(err) {
		t.Errorf("login with the old password: %v, want it refused by the server", err)
	}
	must(t, lab.loginWith(ctx, user, pw2))
}

// credFunction: Options.Credentials hands out a cached token (Expires 10
// minutes away); the server's password changes and every session is
// ended; the new connects are refused with the cached token, call the
// function again at once (one call shared by all of them) and succeed.
func credFunction(t *testing.T, lab *authLab) {
	ctx := ctxT(t, 2*time.Minute)
	const user = "fn_user"
	pw1, pw2 := secret("old"), secret("new")
	must(t, lab.createUser(ctx, user, pw1))
	tok := &tokenSource{password: pw1, ttl: 10 * time.Minute}
	db := lab.openWithOptions(t, user, tok.fn)
	l := startCredLoad(t, db, lab.idQuery)
	time.Sleep(credStepPause)
	must(t, lab.setPassword(ctx, user, pw2))
	tok.set(pw2) // the cache still holds pw1 for 9 more minutes
	old := l.sessions(time.Since(l.start))
	killedAt := time.Since(l.start)
	_, err := lab.killUser(ctx, user)
	must(t, err)
	killed := time.Since(l.start)
	time.Sleep(1500 * time.Millisecond)
	ops := l.stopAndWait(t)

	r := analyse(ops, old, killedAt, killed)
	st, _ := resilientpg.StatsOf(db)
	calls := tok.callCount()
	t.Logf("%s: %d ops, %d FAILED; %d new sessions, the first answering %v after the kill began; function calls %d; connects %d, auth refusals %d (the cached token)",
		lab.name, len(ops), r.failed, r.newSessions, r.firstNew.Round(100*time.Microsecond), calls,
		st.ConnectAttempts, st.ConnectFailures[resilientpg.ClassAuth])
	if r.failed != 0 {
		t.Errorf("%d operations failed, want 0; first errors: %q", r.failed, r.errs)
	}
	if r.newSessions == 0 || r.afterOnOld != 0 {
		t.Errorf("after the kill: %d new sessions, %d ops on killed ones", r.newSessions, r.afterOnOld)
	}
	if calls != 2 {
		t.Errorf("%d function calls, want 2: the first, and one refresh shared by the refused connects", calls)
	}
	if st.ConnectFailures[resilientpg.ClassAuth] == 0 {
		t.Errorf("no refused connect: the test did not exercise the refresh")
	}
}

// credRollover: tokens valid 3 s (an RDS IAM token, scaled down): each
// connection is replaced before its token expires, and nothing fails.
func credRollover(t *testing.T, lab *authLab) {
	ctx := ctxT(t, 2*time.Minute)
	const user, ttl = "iam_user", 3 * time.Second
	pw := secret("token")
	must(t, lab.createUser(ctx, user, pw))
	tok := &tokenSource{password: pw, ttl: ttl}
	db := lab.openWithOptions(t, user, tok.fn)
	l := startCredLoad(t, db, lab.idQuery)
	time.Sleep(7 * time.Second)
	ops := l.stopAndWait(t)

	r := analyse(ops, nil, 0, 0)
	longest := time.Duration(0)
	for _, s := range l.spans(ops) {
		longest = max(longest, s.last-s.first)
	}
	t.Logf("%s: %d ops, %d FAILED; %d sessions, longest seen alive %v with %v tokens; function calls %d",
		lab.name, len(ops), r.failed, len(l.spans(ops)), longest.Round(time.Millisecond), ttl, tok.callCount())
	if r.failed != 0 {
		t.Errorf("%d operations failed, want 0; first errors: %q", r.failed, r.errs)
	}
	// A connection past its deadline is replaced at its next checkout or
	// return, so the last operation it started may end a moment later.
	if slack := 250 * time.Millisecond; longest > ttl+slack {
		t.Errorf("a session answered for %v, longer than its token's %v (plus %v for the last operation)", longest, ttl, slack)
	}
	if len(l.spans(ops)) < 2*credWorkers {
		t.Errorf("%d sessions in 7 s of 3 s tokens, want the pool replaced at least once", len(l.spans(ops)))
	}
}

// credRevocation: Vault's default revocation. A new user with a new
// password is written to both files; the old role loses its privileges
// and is dropped, its sessions left open. Operations continue on new
// sessions; each old session fails at most one caller (42501, 42704;
// MariaDB 1142), because that error marks it bad, instead of failing every
// caller that gets it until it ages out.
func credRevocation(t *testing.T, lab *authLab) {
	ctx := ctxT(t, 2*time.Minute)
	const v1, v2 = "v_app_1", "v_app_2"
	pw1, pw2 := secret("lease1"), secret("lease2")
	must(t, lab.createUser(ctx, v1, pw1))
	vol := newSecretVolume(t, map[string]string{"username": v1, "password": pw1})
	db := openDB(t, lab.driver, lab.dsn("unused", "",
		fileKey("resilient_user_file", vol.path("username")), fileKey("resilient_password_file", vol.path("password"))))
	l := startCredLoad(t, db, lab.idQuery)
	must(t, lab.createUser(ctx, v2, pw2))
	vol.update(t, map[string]string{"username": v2, "password": pw2})
	time.Sleep(credStepPause)
	old := l.sessions(time.Since(l.start))
	revoked := time.Since(l.start)
	must(t, lab.revokeDrop(ctx, v1))
	time.Sleep(2500 * time.Millisecond)
	ops := l.stopAndWait(t)

	r := analyse(ops, old, revoked, revoked)
	var other []string
	lastFail, tail, tailOld := time.Duration(0), 0, 0
	end := ops[len(ops)-1].end
	for _, op := range ops {
		if op.err != nil {
			lastFail = max(lastFail, op.end)
			if !lab.revoked(op.err) && len(other) < 3 {
				other = append(other, op.err.Error())
			}
			continue
		}
		if op.start > end-time.Second {
			tail++
			if !strings.HasPrefix(op.user, v2) {
				tailOld++
			}
		}
	}
	t.Logf("%s: %d ops, %d FAILED (%d sessions of the revoked role), the last %v after the revocation; last second: %d successful ops, %d not as %s",
		lab.name, len(ops), r.failed, len(old), (lastFail - revoked).Round(time.Millisecond), tail, tailOld, v2)
	if len(other) > 0 {
		t.Errorf("failures other than the revoked role's permission errors: %q", other)
	}
	if r.failed > len(old) {
		t.Errorf("%d operations failed on %d sessions of the revoked role: a session whose role lost its privileges must be "+
			"marked bad at its first such error (conn.handleErr in retry.go: 42501, 42704 \"invalid role OID\", 1142, 1143, "+
			"when the connector has a source of credentials), not fail caller after caller",
			r.failed, len(old))
	}
	if tail == 0 || tailOld != 0 {
		t.Errorf("last second: %d successful ops, %d not as %s; want them all, on the new user's sessions", tail, tailOld, v2)
	}
	if err := lab.loginWith(ctx, v1, pw1); !lab.refused(err) {
		t.Errorf("login as the dropped role: %v, want it refused", err)
	}
}

// credErrors: a failing function, a missing file, an empty file and a
// wrong password each fail the connect at once with a clear error that
// names the source and never a password, and none closes the gate.
func credErrors(t *testing.T, lab *authLab) {
	ctx := ctxT(t, time.Minute)
	const user = "err_user"
	pw := secret("real")
	must(t, lab.createUser(ctx, user, pw))
	dir := t.TempDir()
	empty, wrong := dir+"/empty", dir+"/wrong"
	wrongPw := secret("wrong")
	must(t, writeText(empty, "\n"))
	must(t, writeText(wrong, wrongPw+"\n"))
	failing := func(context.Context) (resilientpg.Credentials, error) {
		return resilientpg.Credentials{}, errorString("vault: 403 permission denied")
	}
	for _, tc := range []struct {
		name string
		db   *sql.DB
		want []string
	}{
		{"function", lab.openWithOptions(t, user, failing), []string{"Options.Credentials", "vault: 403 permission denied"}},
		{"missing file", openDB(t, lab.driver, lab.dsn(user, "", fileKey("resilient_password_file", dir+"/missing"))),
			[]string{"resilient_password_file", dir + "/missing", "no such file"}},
		{"empty file", openDB(t, lab.driver, lab.dsn(user, "", fileKey("resilient_password_file", empty))),
			[]string{"resilient_password_file", empty, "empty"}},
		{"wrong password", openDB(t, lab.driver, lab.dsn(user, "", fileKey("resilient_password_file", wrong))), []string{user}},
	} {
		start := time.Now()
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := tc.db.PingContext(pctx)
		cancel()
		took := time.Since(start)
		st, _ := resilientpg.StatsOf(tc.db)
		t.Logf("%s: after %v: %v", tc.name, took.Round(time.Microsecond), err)
		if err == nil {
			t.Errorf("%s: connected", tc.name)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not name %q", tc.name, err, w)
			}
		}
		if strings.Contains(err.Error(), pw) || strings.Contains(err.Error(), wrongPw) {
			t.Errorf("%s: %q shows a password", tc.name, err)
		}
		if took > 2*time.Second || st.Gate.State != resilientpg.ServerUp || st.Gate.Outages != 0 {
			t.Errorf("%s: failed after %v with gate %+v; want at once, gate up", tc.name, took, st.Gate)
		}
	}
}

// credPgpassfile: the regression against bare pgx. With no password in
// the DSN, a new connection takes the password PGPASSFILE holds now.
func credPgpassfile(t *testing.T, lab *authLab) {
	ctx := ctxT(t, time.Minute)
	const user = "passfile_user"
	pw1, pw2 := secret("old"), secret("new")
	must(t, lab.createUser(ctx, user, pw1))
	passfile := t.TempDir() + "/pgpass"
	line := func(pw string) string { return lab.addr + ":test:" + user + ":" + pw + "\n" }
	must(t, writeText(passfile, line(pw1)))
	t.Setenv("PGPASSFILE", passfile)
	t.Setenv("PGPASSWORD", "")
	for _, driverName := range []string{lab.bare, lab.driver} {
		must(t, lab.setPassword(ctx, user, pw1))
		must(t, writeText(passfile, line(pw1)))
		db := openDB(t, driverName, lab.dsn(user, ""))
		first, err := db.Conn(ctx)
		must(t, err)
		must(t, first.PingContext(ctx))
		must(t, lab.setPassword(ctx, user, pw2))
		must(t, writeText(passfile, line(pw2)))
		second, err := db.Conn(ctx) // the first is held: a new connection
		if err == nil {
			err = second.PingContext(ctx)
			second.Close()
		}
		first.Close()
		t.Logf("%s: second connect after the passfile changed: %v", driverName, err)
		if err != nil {
			t.Errorf("%s: the second connect did not use PGPASSFILE's new password: %v", driverName, err)
		}
	}
}

// credKeywordDSN: both file keys in a keyword/value DSN are taken out of
// it (pgx would send them as startup parameters, which the server refuses)
// and give the connection its user and password.
func credKeywordDSN(t *testing.T, lab *authLab) {
	ctx := ctxT(t, time.Minute)
	const user = "kv_user"
	pw := secret("kv")
	must(t, lab.createUser(ctx, user, pw))
	vol := newSecretVolume(t, map[string]string{"username": user, "password": pw})
	host, port, _ := strings.Cut(lab.addr, ":")
	db := openDB(t, lab.driver, "host="+host+" port="+port+" dbname=test sslmode=disable user=someone_else"+
		" resilient_user_file="+vol.path("username")+" resilient_password_file="+vol.path("password"))
	var got string
	must(t, db.QueryRowContext(ctx, "SELECT current_user").Scan(&got))
	if got != user {
		t.Errorf("logged in as %q, want %q from resilient_user_file", got, user)
	}
}

// sync.Mutex-guarded Options.Credentials for the tests.
type tokenSource struct {
	mu       sync.Mutex
	password string
	ttl      time.Duration
	calls    int
}

func (s *tokenSource) fn(context.Context) (resilientpg.Credentials, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	return resilientpg.Credentials{Password: s.password, Expires: time.Now().Add(s.ttl)}, nil
}

func (s *tokenSource) set(pw string) {
	s.mu.Lock()
	s.password = pw
	s.mu.Unlock()
}

func (s *tokenSource) callCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}
