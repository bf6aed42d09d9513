package resilientpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"reflect"
	"testing"

	"github.com/jackc/pgx/v5/stdlib"
)

// optionalConnInterfaces are the interfaces database/sql looks for on a
// driver.Conn.
var optionalConnInterfaces = map[string]reflect.Type{
	"ConnPrepareContext": reflect.TypeFor[driver.ConnPrepareContext](),
	"ConnBeginTx":        reflect.TypeFor[driver.ConnBeginTx](),
	"ExecerContext":      reflect.TypeFor[driver.ExecerContext](),
	"QueryerContext":     reflect.TypeFor[driver.QueryerContext](),
	"Execer":             reflect.TypeFor[driver.Execer](),  //lint:ignore SA1019 checked on purpose
	"Queryer":            reflect.TypeFor[driver.Queryer](), //lint:ignore SA1019 checked on purpose
	"NamedValueChecker":  reflect.TypeFor[driver.NamedValueChecker](),
	"Pinger":             reflect.TypeFor[driver.Pinger](),
	"SessionResetter":    reflect.TypeFor[driver.SessionResetter](),
	"Validator":          reflect.TypeFor[driver.Validator](),
}

// implemented lists which of the conn interfaces t implements.
func implemented(t reflect.Type) map[string]bool { return implementedOf(t, optionalConnInterfaces) }

// implementedOf lists which of set's interfaces t implements.
func implementedOf(t reflect.Type, set map[string]reflect.Type) map[string]bool {
	got := map[string]bool{}
	for name, it := range set {
		if t.Implements(it) {
			got[name] = true
		}
	}
	return got
}

// TestPgxConnInterfaces pins the interface set of pgx's *stdlib.Conn. If a
// pgx upgrade changes it, review conn.go's forwarding (a new Validator, for
// one, would have to be combined with the wrapper's own) and update this
// table. The mysql conn type is unexported; integration's parity test pins it.
func TestPgxConnInterfaces(t *testing.T) {
	want := map[string]bool{"ConnPrepareContext": true, "ConnBeginTx": true, "ExecerContext": true,
		"QueryerContext": true, "NamedValueChecker": true, "Pinger": true, "SessionResetter": true}
	got := implemented(reflect.TypeFor[*stdlib.Conn]())
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("*stdlib.Conn implements %v, the wrapper was written for %v: review conn.go", got, want)
	}
	wrapper := implemented(reflect.TypeFor[*conn]())
	for name := range got {
		if !wrapper[name] && name != "Execer" && name != "Queryer" {
			t.Errorf("wrapper lacks %s, which pgx has", name)
		}
	}
}

// TestForwardingParity drives every optional method of the wrapper over
// each fake shape: where the inner conn has the interface the call must
// reach it; where it does not, the wrapper must do what database/sql does.
func TestForwardingParity(t *testing.T) {
	ctx := context.Background()
	args := []driver.NamedValue{{Ordinal: 1, Value: int64(7)}}
	for _, shape := range []fakeShape{shapePgx, shapeMySQL, shapeBare, shapeLegacy} {
		t.Run(shape.String(), func(t *testing.T) {
			c, f := newFakeConnector(shape, DefaultOptions())
			w, fc := connect(c, f)
			inner := w.inner
			_, hasExecCtx := inner.(driver.ExecerContext)
			_, hasExec := inner.(driver.Execer) //lint:ignore SA1019 parity with the legacy path
			_, hasQueryCtx := inner.(driver.QueryerContext)
			_, hasQuery := inner.(driver.Queryer) //lint:ignore SA1019 parity with the legacy path
			_, hasChecker := inner.(driver.NamedValueChecker)
			_, hasPinger := inner.(driver.Pinger)

			_, err := w.ExecContext(ctx, "e", args)
			switch {
			case hasExecCtx || hasExec:
				if err != nil || fc.execs.Load() != 1 || fc.lastQuery != "e" || fc.lastArgs[0].Value != int64(7) {
					t.Errorf("ExecContext not forwarded: err %v, execs %d", err, fc.execs.Load())
				}
			case err != driver.ErrSkip:
				t.Errorf("ExecContext without Execer: err %v, want ErrSkip (database/sql then prepares)", err)
			}
			if hasExec && !hasExecCtx {
				_, err := w.ExecContext(ctx, "e", []driver.NamedValue{{Name: "n", Ordinal: 1, Value: 1}})
				if err == nil || err.Error() != "sql: driver does not support the use of Named Parameters" {
					t.Errorf("legacy Exec with a named arg: %v", err)
				}
			}

			_, err = w.QueryContext(ctx, "q", args)
			switch {
			case hasQueryCtx || hasQuery:
				if err != nil || fc.queries.Load() != 1 {
					t.Errorf("QueryContext not forwarded: err %v", err)
				}
			case err != driver.ErrSkip:
				t.Errorf("QueryContext without Queryer: err %v, want ErrSkip", err)
			}

			err = w.CheckNamedValue(&driver.NamedValue{Value: struct{}{}})
			if hasChecker != (err == nil) || !hasChecker && err != driver.ErrSkip {
				t.Errorf("CheckNamedValue: err %v with inner checker %v", err, hasChecker)
			}

			if err := w.Ping(ctx); err != nil || fc.pings.Load() != map[bool]int64{true: 1}[hasPinger] {
				t.Errorf("Ping: err %v, inner pings %d, inner Pinger %v", err, fc.pings.Load(), hasPinger)
			}

			if _, err := w.PrepareContext(ctx, "p"); err != nil || fc.prepares.Load() != 1 {
				t.Errorf("PrepareContext: err %v, prepares %d", err, fc.prepares.Load())
			}
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			if _, isCtx := inner.(driver.ConnPrepareContext); !isCtx {
				if _, err := w.PrepareContext(cctx, "p"); err != context.Canceled {
					t.Errorf("PrepareContext fallback on a cancelled ctx: %v, want context.Canceled", err)
				}
			}

			if _, err := w.BeginTx(ctx, driver.TxOptions{}); err != nil || fc.begins.Load() != 1 {
				t.Errorf("BeginTx: err %v, begins %d", err, fc.begins.Load())
			}
			if _, isCtx := inner.(driver.ConnBeginTx); !isCtx {
				_, err := w.BeginTx(ctx, driver.TxOptions{Isolation: driver.IsolationLevel(sql.LevelSerializable)})
				if err == nil || err.Error() != "sql: driver does not support non-default isolation level" {
					t.Errorf("BeginTx fallback with isolation: %v", err)
				}
				_, err = w.BeginTx(ctx, driver.TxOptions{ReadOnly: true})
				if err == nil || err.Error() != "sql: driver does not support read-only transactions" {
					t.Errorf("BeginTx fallback read-only: %v", err)
				}
			}
		})
	}
}

// TestShapesThroughDatabaseSQL: every shape works end to end through
// database/sql, including the paths where database/sql itself falls back.
func TestShapesThroughDatabaseSQL(t *testing.T) {
	ctx := context.Background()
	for _, shape := range []fakeShape{shapePgx, shapeMySQL, shapeBare, shapeLegacy} {
		t.Run(shape.String(), func(t *testing.T) {
			c, f := newFakeConnector(shape, DefaultOptions())
			db := sql.OpenDB(c)
			defer db.Close()
			if _, err := db.ExecContext(ctx, "e", 1); err != nil {
				t.Fatal(err)
			}
			var v int64
			if err := db.QueryRowContext(ctx, "q", 1).Scan(&v); err != nil {
				t.Fatal(err)
			}
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			if err := db.PingContext(ctx); err != nil {
				t.Fatal(err)
			}
			fc := f.conn(0)
			if fc.execs.Load() != 1 || fc.queries.Load() != 1 || fc.begins.Load() != 1 {
				t.Errorf("inner saw execs %d queries %d begins %d, want 1 each", fc.execs.Load(), fc.queries.Load(), fc.begins.Load())
			}
			if f.opens.Load() != 1 {
				t.Errorf("opens = %d, want 1 reused conn", f.opens.Load())
			}
		})
	}
}

type rawLayer struct{ driver.Conn }

func (r rawLayer) Raw() driver.Conn { return r.Conn }

type selfLayer struct{ driver.Conn }

func (s *selfLayer) Unwrap() driver.Conn { return s }

func TestUnwrapConn(t *testing.T) {
	c, f := newFakeConnector(shapePgx, DefaultOptions())
	w, fc := connect(c, f)
	inner := w.inner.(*pgxLikeConn)
	if got := UnwrapConn(w); got != inner {
		t.Fatalf("UnwrapConn(wrapper) = %T, want the inner conn", got)
	}
	// An otelsql-style layer over ours over another of ours.
	w2 := &conn{inner: w}
	if got := UnwrapConn(rawLayer{w2}); got != inner || got.(*pgxLikeConn).fakeConn != fc {
		t.Fatalf("UnwrapConn through Raw and two Unwraps = %T", got)
	}
	if got := UnwrapConn(inner); got != inner {
		t.Fatal("UnwrapConn of an unwrapped conn must return it")
	}
	s := &selfLayer{}
	if got := UnwrapConn(s); got != s {
		t.Fatal("a self-referencing layer must end the peeling")
	}
}
