package resilientpg

import (
	"context"
	"database/sql/driver"
)

// stmt wraps a prepared statement so that its failures get the same
// handling as the conn's own statements: marking the connection, the
// transaction guard, and a retry where the statement provably did not run.
// It matters for go-sql-driver/mysql, which without interpolateParams runs
// every statement with arguments as a server-side prepared statement: a
// demoted primary's read-only error (1290) comes from the statement, and
// only through it can the wrapper retire the pool and have database/sql
// run the statement again on a new connection.
//
// Like conn, it implements every optional interface database/sql looks for
// and falls back exactly as database/sql would where the inner statement
// lacks one (ctxDriverStmtExec, ctxDriverStmtQuery, driverArgsConnLocked),
// except ColumnConverter, whose mere presence changes how database/sql
// converts arguments: stmtCC adds it only when the inner statement has it.
type stmt struct {
	inner    driver.Stmt
	c        *conn
	execCtx  driver.StmtExecContext
	queryCtx driver.StmtQueryContext
	checker  driver.NamedValueChecker
}

// stmtCC is a stmt whose inner statement is a ColumnConverter.
type stmtCC struct {
	*stmt
	cc driver.ColumnConverter //lint:ignore SA1019 the legacy interface database/sql still honours
}

var (
	_ driver.Stmt              = (*stmt)(nil)
	_ driver.StmtExecContext   = (*stmt)(nil)
	_ driver.StmtQueryContext  = (*stmt)(nil)
	_ driver.NamedValueChecker = (*stmt)(nil)
	_ driver.ColumnConverter   = stmtCC{} //lint:ignore SA1019 see stmtCC
)

// wrapStmt wraps a statement the inner conn prepared.
func (c *conn) wrapStmt(inner driver.Stmt) driver.Stmt {
	s := &stmt{inner: inner, c: c}
	s.execCtx, _ = inner.(driver.StmtExecContext)
	s.queryCtx, _ = inner.(driver.StmtQueryContext)
	s.checker, _ = inner.(driver.NamedValueChecker)
	//lint:ignore SA1019 see stmtCC
	if cc, ok := inner.(driver.ColumnConverter); ok {
		return stmtCC{s, cc}
	}
	return s
}

// ColumnConverter forwards to the inner statement.
func (s stmtCC) ColumnConverter(idx int) driver.ValueConverter { return s.cc.ColumnConverter(idx) }

// Unwrap returns the inner driver statement.
func (s *stmt) Unwrap() driver.Stmt { return s.inner }

func (s *stmt) Close() error  { return s.inner.Close() }
func (s *stmt) NumInput() int { return s.inner.NumInput() }

// Exec is the legacy method; database/sql calls ExecContext.
func (s *stmt) Exec(args []driver.Value) (driver.Result, error) {
	if err := s.c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := s.c.inTx()
	r, err := s.inner.Exec(args) //lint:ignore SA1019 forwarding the required method
	if err != nil {
		return nil, s.c.handleErr(context.Background(), err, inTx)
	}
	return r, nil
}

// Query is the legacy method; database/sql calls QueryContext.
func (s *stmt) Query(args []driver.Value) (driver.Rows, error) {
	if err := s.c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := s.c.inTx()
	r, err := s.inner.Query(args) //lint:ignore SA1019 forwarding the required method
	if err != nil {
		return nil, s.c.handleErr(context.Background(), err, inTx)
	}
	return s.c.wrapRows(r, inTx), nil
}

// ExecContext forwards, or does what database/sql's ctxDriverStmtExec does.
func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if err := s.c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := s.c.inTx()
	var r driver.Result
	var err error
	if s.execCtx != nil {
		r, err = s.execCtx.ExecContext(ctx, args)
	} else {
		var dargs []driver.Value
		if dargs, err = namedValueToValue(args); err != nil {
			return nil, err
		}
		if err = ctx.Err(); err != nil {
			return nil, err
		}
		r, err = s.inner.Exec(dargs) //lint:ignore SA1019 the fallback database/sql itself uses
	}
	if err != nil {
		return nil, s.c.handleErr(ctx, err, inTx)
	}
	return r, nil
}

// QueryContext forwards, or does what database/sql's ctxDriverStmtQuery does.
func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if err := s.c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := s.c.inTx()
	var r driver.Rows
	var err error
	if s.queryCtx != nil {
		r, err = s.queryCtx.QueryContext(ctx, args)
	} else {
		var dargs []driver.Value
		if dargs, err = namedValueToValue(args); err != nil {
			return nil, err
		}
		if err = ctx.Err(); err != nil {
			return nil, err
		}
		r, err = s.inner.Query(dargs) //lint:ignore SA1019 the fallback database/sql itself uses
	}
	if err != nil {
		return nil, s.c.handleErr(ctx, err, inTx)
	}
	return s.c.wrapRows(r, inTx), nil
}

// CheckNamedValue does what database/sql does for a statement that is not
// a NamedValueChecker: ask the statement's, else the conn's (which
// forwards to the inner conn's or returns ErrSkip); ErrSkip sends
// database/sql on to ColumnConverter, then its default conversion.
func (s *stmt) CheckNamedValue(nv *driver.NamedValue) error {
	if s.checker != nil {
		return s.checker.CheckNamedValue(nv)
	}
	return s.c.CheckNamedValue(nv)
}
