package examples

// Layer order: otelsql goes outside, the wrapper inside (next to the
// driver). otelsql forwards ResetSession, IsValid and CheckNamedValue to
// the layer below and exposes it through Raw(), so outside it loses
// nothing of the wrapper: checkout checks still run, and each discard of
// a dead connection shows up as a failed sql.conn.reset_session span,
// while the application's statements get one span each. Inside, otelsql
// would hide the driver from the wrapper: the wrapper recognises pgx's
// *stdlib.Conn to peek at the socket and to read the transaction status,
// so over otelsql's conn it has no socket check, and a session killed
// less than a ping-idle interval (1 s) after its last use reaches the
// application. TestOtelsqlInsideWrapper measures that, without asserting.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"strings"
	"testing"

	"github.com/XSAM/otelsql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/resilientpg/resilientpg"
)

func newTracer(t *testing.T) (*sdktrace.TracerProvider, *tracetest.SpanRecorder) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	return tp, rec
}

// otelFlow creates the table, bulk-loads it with pgx's CopyFrom through
// sql.Conn.Raw and UnwrapConn, and returns the operation the burst runs.
func otelFlow(t *testing.T, db *sql.DB, table string) func(ctx context.Context, i int) error {
	t.Helper()
	ctx := ctxT(t)
	for _, q := range []string{"DROP TABLE IF EXISTS " + table, "CREATE TABLE " + table + " (id BIGINT PRIMARY KEY, name TEXT)"} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	t.Cleanup(func() { db.Exec("DROP TABLE IF EXISTS " + table) })

	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = conn.Raw(func(dc any) error {
		pc, ok := resilientpg.UnwrapConn(dc).(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("UnwrapConn(%T) = %T, want *stdlib.Conn", dc, resilientpg.UnwrapConn(dc))
		}
		_, err := pc.Conn().CopyFrom(ctx, pgx.Identifier{table}, []string{"id", "name"},
			pgx.CopyFromRows([][]any{{1, "a"}, {2, "b"}}))
		return err
	})
	if err != nil {
		t.Fatalf("CopyFrom through Raw: %v", err)
	}

	return func(ctx context.Context, i int) error {
		if _, err := db.ExecContext(ctx, "INSERT INTO "+table+" (id, name) VALUES ($1, $2)", 100+i, "x"); err != nil {
			return err
		}
		var n int
		if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+table+" WHERE id IN (1, 2, $1)", 100+i).Scan(&n); err != nil {
			return err
		}
		if n != 3 {
			return fmt.Errorf("count = %d, want 3", n)
		}
		return nil
	}
}

// checkSpans asserts that otelsql recorded a span for every statement of
// the burst, and logs the checkout discards it saw.
func checkSpans(t *testing.T, rec *tracetest.SpanRecorder, table string) {
	t.Helper()
	var stmts, resets, failedResets int
	for _, s := range rec.Ended() {
		switch s.Name() {
		case string(otelsql.MethodConnExec), string(otelsql.MethodConnQuery):
			for _, a := range s.Attributes() {
				if v := a.Value.String(); strings.Contains(v, "INTO "+table) || strings.Contains(v, "FROM "+table) {
					stmts++
					break
				}
			}
		case string(otelsql.MethodConnResetSession):
			resets++
			if s.Status().Code == codes.Error {
				failedResets++
			}
		}
	}
	t.Logf("otelsql spans: %d for the table's statements, %d reset_session (%d failed: the wrapper discarding dead connections)",
		stmts, resets, failedResets)
	if stmts < 2*burstOps {
		t.Errorf("otelsql recorded %d statement spans for %s, want at least %d", stmts, table, 2*burstOps)
	}
}

// TestOtelsqlOpen: otelsql.Open("resilientpg", ...) wraps the wrapper's
// registered driver, so otelsql is outside.
func TestOtelsqlOpen(t *testing.T) {
	t.Parallel()
	tg := pgTarget(t, "otel_open")
	tp, rec := newTracer(t)
	db, err := otelsql.Open("resilientpg", tg.dsn, otelsql.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	sizePool(db)
	op := otelFlow(t, db, "ex_otel_open")
	proveAfterKill(t, tg, db, "otelsql.Open(resilientpg)", op)
	checkSpans(t, rec, "ex_otel_open")
}

// TestOtelsqlOpenDB: otelsql.OpenDB over a resilientpg connector built in
// code; otelsql again outside.
func TestOtelsqlOpenDB(t *testing.T) {
	t.Parallel()
	tg := pgTarget(t, "otel_opendb")
	tp, rec := newTracer(t)
	c, err := resilientpg.NewConnector(stdlib.GetDefaultDriver(), resilientpg.DefaultOptions(), tg.dsn)
	if err != nil {
		t.Fatal(err)
	}
	db := otelsql.OpenDB(c, otelsql.WithTracerProvider(tp))
	t.Cleanup(func() { db.Close() })
	sizePool(db)
	op := otelFlow(t, db, "ex_otel_opendb")
	proveAfterKill(t, tg, db, "otelsql.OpenDB(resilientpg connector)", op)
	checkSpans(t, rec, "ex_otel_opendb")
}

// TestOtelsqlInsideWrapper is the other order: the wrapper finds pgx's
// connection through otelsql's Raw (UnwrapConn), so its socket and
// transaction checks still work. otelsql still belongs outside (see the
// README), but this order must not lose operations either.
func TestOtelsqlInsideWrapper(t *testing.T) {
	t.Parallel()
	tg := pgTarget(t, "otel_inside")
	tp, _ := newTracer(t)
	otc, err := otelsql.WrapDriver(stdlib.GetDefaultDriver(), otelsql.WithTracerProvider(tp)).(driver.DriverContext).OpenConnector(tg.dsn)
	if err != nil {
		t.Fatal(err)
	}
	db, err := resilientpg.OpenDB(otc, resilientpg.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	sizePool(db)
	op := otelFlow(t, db, "ex_otel_inside")
	proveAfterKill(t, tg, db, "resilientpg.OpenDB(otelsql connector)", op)
}
