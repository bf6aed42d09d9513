// Command resilientpg-demo shows resilientpg surviving real faults.
//
// With no arguments it starts a throwaway PostgreSQL (with -mysql, MariaDB)
// from the installed binaries, puts a TCP fault proxy in front of it, and
// runs the same workload through the bare driver (pgx, go-sql-driver/mysql)
// and through resilientpg side by side while it kills sessions, restarts the
// server, black-holes connections and takes the server away for 3 s. It
// prints what each application saw: operations, failures and p99 latency.
//
// With -dsn it uses an existing PostgreSQL instead and runs only the
// session-kill faults, terminating only its own sessions (found by
// application_name).
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"

	_ "github.com/resilientpg/resilientpg"
	"github.com/resilientpg/resilientpg/internal/faultlab"
)

const (
	poolSize = 10
	opTO     = 5 * time.Second // each operation's deadline, as a request handler would set
	appName  = "resilientpg-demo"
)

func main() {
	useMySQL := flag.Bool("mysql", false, "use a throwaway MariaDB instead of PostgreSQL")
	dsn := flag.String("dsn", "", "use this existing PostgreSQL (session-kill faults only)")
	flag.Parse()
	// The driver logs every broken connection; the table says it better.
	mysql.SetLogger(&mysql.NopLogger{})
	if err := run(*useMySQL, *dsn); err != nil {
		fmt.Fprintln(os.Stderr, "resilientpg-demo:", err)
		os.Exit(1)
	}
}

// server is what the phases need from the database under test.
type server struct {
	name       string
	bare, wrap string // driver names
	dsn        string // through the proxy when the server is ours
	kill       func(context.Context) (int, error)
	stop       func(faultlab.StopMode) error
	start      func(context.Context) error
	proxy      *faultlab.Proxy
	cleanup    func()
}

func run(useMySQL bool, dsn string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var srv *server
	var err error
	switch {
	case dsn != "" && useMySQL:
		return errors.New("-dsn works with PostgreSQL only; -mysql starts its own MariaDB")
	case dsn != "":
		srv, err = existingPostgres(ctx, dsn)
	case useMySQL:
		srv, err = ownMariaDB(ctx)
	default:
		srv, err = ownPostgres(ctx)
	}
	if err != nil {
		return err
	}
	defer srv.cleanup()

	pools := map[string]*sql.DB{}
	for _, name := range []string{srv.bare, srv.wrap} {
		db, err := sql.Open(name, srv.dsn)
		if err != nil {
			return err
		}
		defer db.Close()
		db.SetMaxOpenConns(poolSize)
		db.SetMaxIdleConns(poolSize)
		pools[name] = db
	}
	fmt.Printf("%s: %s vs %s, pool %d, %v deadline per operation\n\n", srv.name, srv.bare, srv.wrap, poolSize, opTO)

	var rows []row
	for _, ph := range phases(srv) {
		if ph.needsOwn && srv.stop == nil {
			continue
		}
		res, err := runPhase(ctx, ph, srv, pools, []string{srv.bare, srv.wrap})
		if err != nil {
			return fmt.Errorf("%s: %w", ph.name, err)
		}
		rows = append(rows, res...)
	}
	printTable(rows)
	return nil
}

func pgAdmin(ctx context.Context, dsn string) (*sql.DB, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	return db, db.PingContext(ctx)
}

func ownPostgres(ctx context.Context) (*server, error) {
	fmt.Fprintln(os.Stderr, "starting a throwaway PostgreSQL...")
	pg, err := faultlab.StartPostgres(ctx, faultlab.PostgresOptions{})
	if err != nil {
		return nil, err
	}
	px, err := faultlab.NewProxy(pg.Addr())
	if err != nil {
		pg.Close()
		return nil, err
	}
	return &server{
		name: "PostgreSQL (throwaway, " + pg.Addr() + ", via fault proxy " + px.Addr() + ")",
		bare: "pgx", wrap: "resilientpg",
		dsn:  fmt.Sprintf("postgres://postgres@%s/test?sslmode=disable&application_name=%s", px.Addr(), appName),
		kill: pg.KillSessions, stop: pg.Stop, start: pg.Start, proxy: px,
		cleanup: func() { px.Close(); pg.Close() },
	}, nil
}

func ownMariaDB(ctx context.Context) (*server, error) {
	fmt.Fprintln(os.Stderr, "starting a throwaway MariaDB...")
	m, err := faultlab.StartMariaDB(ctx, faultlab.MariaDBOptions{})
	if err != nil {
		return nil, err
	}
	px, err := faultlab.NewProxy(m.Addr())
	if err != nil {
		m.Close()
		return nil, err
	}
	return &server{
		name: "MariaDB (throwaway, " + m.Addr() + ", via fault proxy " + px.Addr() + ")",
		bare: "mysql", wrap: "resilientmysql",
		dsn:  fmt.Sprintf("root@tcp(%s)/test", px.Addr()),
		kill: m.KillSessions, stop: m.Stop, start: m.Start, proxy: px,
		cleanup: func() { px.Close(); m.Close() },
	}, nil
}

func existingPostgres(ctx context.Context, dsn string) (*server, error) {
	sep := " "
	if strings.Contains(dsn, "://") {
		sep = "&"
		if !strings.Contains(dsn, "?") {
			sep = "?"
		}
	}
	own := dsn + sep + "application_name=" + appName
	admin, err := pgAdmin(ctx, dsn)
	if err != nil {
		return nil, err
	}
	kill := func(ctx context.Context) (int, error) {
		var n int
		err := admin.QueryRowContext(ctx, `SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
			WHERE application_name = $1 AND pid <> pg_backend_pid()`, appName).Scan(&n)
		return n, err
	}
	return &server{name: "PostgreSQL (existing, from -dsn)", bare: "pgx", wrap: "resilientpg",
		dsn: own, kill: kill, cleanup: func() { admin.Close() }}, nil
}

type row struct {
	phase, driver string
	r             result
	account       string // the wrapper's own account of the phase; "" for the bare driver
}

func printTable(rows []row) {
	fmt.Println()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "fault\tdriver\tops\tfailed\tp99\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%v\t\n", r.phase, r.driver, r.r.ops, r.r.failed, r.r.p99().Round(time.Millisecond))
	}
	tw.Flush()
	fmt.Println()
	fmt.Println("What resilientpg saw (resilientpg.StatsOf, per fault):")
	for _, r := range rows {
		if r.account != "" {
			fmt.Printf("  %s: %s\n", r.phase, r.account)
		}
	}
	fmt.Println()
	for _, r := range rows {
		if r.r.firstErr != "" {
			fmt.Printf("first error, %s / %s: %s\n", r.phase, r.driver, r.r.firstErr)
		}
	}
}
