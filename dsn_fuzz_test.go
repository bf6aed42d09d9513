package resilientpg

import (
	"maps"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// FuzzDSN checks the claim-and-strip step over all three DSN grammars:
// it never panics, no resilient_ key survives into the inner driver's
// config, stripping twice changes nothing, no error shows the password,
// and the credential file keys are taken only as absolute paths, the user
// file only with the password file.
func FuzzDSN(f *testing.F) {
	for _, q := range []string{
		"resilient_ping=always", "resilient_max_age=0&resilient_max_age_jitter=2m",
		"resilient_ping_idle=-1s", "RESILIENT_PING=never", "resilient_max_age_jitter=10%25",
		"resilient_pingg=1", "resilient_max_open_conns=3", "sslmode=disable&application_name=x",
		"resilient_ping_timeout=0", "a=b&resilient_max_idle_time=5m&c=d",
		"resilient_log=debug&resilient_leak_threshold=30s", "resilient_log=loud", "resilient_leak_threshold=-1s",
		"resilient_password_file=%2Frun%2Fsecrets%2Fpw", "resilient_password_file=pw",
		"resilient_user_file=%2Frun%2Fu&resilient_password_file=%2Frun%2Fp", "resilient_user_file=%2Fu",
		"RESILIENT_PASSWORD_FILE=%2Fp", "resilient_password_file=",
	} {
		for form := range 3 {
			f.Add(uint8(form), "pw5678", q)
		}
	}
	f.Fuzz(func(t *testing.T, form uint8, password, query string) {
		if len(password) < 6 || strings.ContainsAny(password, "@/:?&= %'\\\"#\x00") || strings.Contains(query, password) {
			password = "Zq9Vx7Pw"
		}
		var dsn string
		switch form % 3 {
		case 0:
			dsn = "postgres://app:" + password + "@127.0.0.1:5432/db?" + query
		case 1:
			dsn = "host=127.0.0.1 user=app password=" + password + " dbname=db " + strings.ReplaceAll(query, "&", " ")
		case 2:
			dsn = "app:" + password + "@tcp(127.0.0.1:3306)/db?" + query
		}
		o := DefaultOptions()
		var params map[string]string
		var err error
		if form%3 == 2 {
			cfg, perr := parseMySQLConfig(dsn, &o, true)
			if err = perr; err == nil {
				params = cfg.Params
			}
		} else {
			cfg, perr := parsePgConfig(dsn, &o, true)
			if err = perr; err == nil {
				params = cfg.RuntimeParams
			}
		}
		if err != nil {
			if strings.Contains(err.Error(), password) {
				t.Fatalf("error shows the password: %v", err)
			}
			return
		}
		for k := range params {
			if isOurKey(k) {
				t.Fatalf("%q survived into the inner config", k)
			}
		}
		for _, p := range []string{o.PasswordFile, o.UserFile} {
			if p != "" && !filepath.IsAbs(p) {
				t.Fatalf("relative credentials path %q accepted", p)
			}
		}
		if o.UserFile != "" && o.PasswordFile == "" {
			t.Fatalf("resilient_user_file accepted without resilient_password_file")
		}
		again := maps.Clone(params)
		o2 := DefaultOptions()
		if err := claimKeys(again, &o2, true); err != nil {
			t.Fatalf("second strip failed: %v", err)
		}
		if !maps.Equal(again, params) || !reflect.DeepEqual(o2, DefaultOptions()) {
			t.Fatalf("stripping is not idempotent: %v -> %v, %+v", params, again, o2)
		}
	})
}
