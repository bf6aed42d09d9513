package resilientpg_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/jackc/pgx/v5/stdlib"

	"github.com/resilientpg/resilientpg"
)

// rdsAuthToken stands for the AWS SDK's auth.BuildAuthToken(ctx, endpoint,
// region, user, creds), which signs a token valid for 15 minutes. Here the
// token service is down, so the example runs without AWS or a server.
func rdsAuthToken(context.Context) (string, error) {
	return "", errors.New("token service unavailable")
}

// Short-lived tokens, such as RDS IAM authentication: the function is
// called for new connections only, its result is reused until a minute
// before Expires, and each connection is replaced before its token
// expires. A failing function fails the connect at once with an error
// that names it; it is not taken for the server being down.
func ExampleOptions_credentials() {
	opts := resilientpg.DefaultOptions()
	opts.Credentials = func(ctx context.Context) (resilientpg.Credentials, error) {
		token, err := rdsAuthToken(ctx) // ctx is bounded by resilient_connect_timeout
		if err != nil {
			return resilientpg.Credentials{}, err
		}
		return resilientpg.Credentials{Password: token, Expires: time.Now().Add(15 * time.Minute)}, nil
	}
	db, err := resilientpg.OpenDB(stdlib.GetDefaultDriver(), opts,
		"postgres://app@127.0.0.1:5432/app?sslmode=disable")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()

	err = db.PingContext(context.Background())
	fmt.Println(err)
	var ce *resilientpg.CredentialError
	fmt.Println(errors.As(err, &ce), ce.Source)
	// Output:
	// resilientpg: connect: credentials from Options.Credentials: token service unavailable
	// true Options.Credentials
}

// Files a Vault agent or a Kubernetes secret volume keeps current: each
// new connection reads them again if they changed (a stat per connect,
// which sees Kubernetes' atomic ..data symlink swap). In a MySQL DSN the
// slashes of a path are written %2F. It needs a server, so it is compiled
// but not run.
func Example_passwordFile() {
	db, err := sql.Open("resilientpg", "postgres://db:5432/app?sslmode=require"+
		"&resilient_user_file=/var/run/secrets/db/username"+
		"&resilient_password_file=/var/run/secrets/db/password")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()

	// MySQL / MariaDB:
	my, err := sql.Open("resilientmysql", "app@tcp(db:3306)/app"+
		"?resilient_password_file=%2Fvar%2Frun%2Fsecrets%2Fdb%2Fpassword")
	if err != nil {
		log.Fatal(err)
	}
	defer my.Close()
}
