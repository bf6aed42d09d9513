package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// conn wraps one inner driver.Conn. It implements the whole set of optional
// interfaces database/sql looks for, and where the inner conn lacks one it
// does exactly what database/sql would do without it (the fallbacks are
// copied from database/sql's ctxutil.go), so wrapping never changes
// behaviour; otelsql's conn.go is the model. Stmt and Tx are wrapped, and
// Rows inside a transaction, for correctness (see stmt, tx and txRows),
// with the same care for the optional interfaces; other Rows are the inner
// driver's own, returned untouched.
//
// Fields without a comment are fixed at connect. The others are guarded by
// database/sql's driverConn lock, which serialises every call on a conn.
type conn struct {
	inner driver.Conn
	c     *Connector
	life  lifetime

	// The inner conn's optional interfaces, asserted once.
	prepCtx   driver.ConnPrepareContext
	beginTx   driver.ConnBeginTx
	execCtx   driver.ExecerContext
	queryCtx  driver.QueryerContext
	execer    driver.Execer  //lint:ignore SA1019 the legacy fallback database/sql itself still honours
	queryer   driver.Queryer //lint:ignore SA1019 as above
	checker   driver.NamedValueChecker
	pinger    driver.Pinger
	resetter  driver.SessionResetter
	validator driver.Validator

	pg   *pgconn.PgConn // non-nil when the inner conn is pgx's *stdlib.Conn
	sock *sockCheck     // nil when the socket is out of reach
	wire *wireConn      // go-sql-driver/mysql's socket, when the wrapper dialed it
	gen  uint64         // the connector's generation at connect
	sess orphan         // its server session, for the reaper (with Options.Reap)

	id   int64     // the connector's sequence number, for log records
	born time.Time // when it connected

	lastActive time.Time   // last checkout or return; guarded by the driverConn lock
	txOpen     bool        // BeginTx succeeded since the last checkout; guarded by the driverConn lock
	fresh      bool        // not yet used: its first call is its checkout; guarded by the driverConn lock
	bad        atomic.Bool // sticky: the conn must not be reused
	deadPath   atomic.Bool // the path to the server died under it: its session may live on
	txFlag     atomic.Bool // txOpen, for the leak watcher's goroutine
	tx         tx          // the transaction guard; guarded by the driverConn lock
	out        checkout    // the current borrow, for the gauges and leak detection
}

// Compile-time proof of the full interface set.
var (
	_ driver.Conn               = (*conn)(nil)
	_ driver.ConnPrepareContext = (*conn)(nil)
	_ driver.ConnBeginTx        = (*conn)(nil)
	_ driver.ExecerContext      = (*conn)(nil)
	_ driver.QueryerContext     = (*conn)(nil)
	_ driver.NamedValueChecker  = (*conn)(nil)
	_ driver.Pinger             = (*conn)(nil)
	_ driver.SessionResetter    = (*conn)(nil)
	_ driver.Validator          = (*conn)(nil)
)

func newConn(c *Connector, inner driver.Conn, now time.Time) *conn {
	w := &conn{inner: inner, c: c, lastActive: now, born: now, fresh: true, gen: c.gen.Load(),
		id: c.connID.Add(1), life: newLifetime(now, c.opts.MaxAge, c.opts.MaxAgeJitter)}
	w.prepCtx, _ = inner.(driver.ConnPrepareContext)
	w.beginTx, _ = inner.(driver.ConnBeginTx)
	w.execCtx, _ = inner.(driver.ExecerContext)
	w.queryCtx, _ = inner.(driver.QueryerContext)
	w.execer, _ = inner.(driver.Execer)   //lint:ignore SA1019 see the field
	w.queryer, _ = inner.(driver.Queryer) //lint:ignore SA1019 see the field
	w.checker, _ = inner.(driver.NamedValueChecker)
	w.pinger, _ = inner.(driver.Pinger)
	w.resetter, _ = inner.(driver.SessionResetter)
	w.validator, _ = inner.(driver.Validator)
	// UnwrapConn also finds pgx under a layer such as otelsql's, so the
	// socket and transaction checks work when the wrapper sits outside it.
	if sc, ok := UnwrapConn(inner).(*stdlib.Conn); ok {
		w.pg = sc.Conn().PgConn()
		w.sock = newSockCheck(w.pg.Conn())
		if c.ownsPgx && sc == inner {
			// Our own pgx connector has no reset hook and no ping, so its
			// ResetSession is only the closed and transaction checks,
			// which checkout does itself.
			w.resetter = nil
		}
	}
	return w
}

// Unwrap returns the inner driver connection; see UnwrapConn.
func (c *conn) Unwrap() driver.Conn { return c.inner }

// inTx reports whether a statement now would run inside a transaction.
// pgx knows it from the server; for other drivers the wrapper tracks
// BeginTx, which is conservative: any statement after it counts.
func (c *conn) inTx() bool {
	if c.pg != nil {
		return c.pg.TxStatus() != 'I'
	}
	return c.txOpen
}

// firstUse is the checkout of a fresh connection: database/sql makes no
// driver call when it hands one out, so its first call stands for it.
func (c *conn) firstUse() {
	c.fresh = false
	c.c.stats.checkouts.Add(1)
	c.markOut(time.Now())
}

func (c *conn) Prepare(query string) (driver.Stmt, error) {
	if c.fresh {
		c.firstUse()
	}
	if err := c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := c.inTx()
	s, err := c.inner.Prepare(query)
	if err != nil {
		return nil, c.handleErr(context.Background(), err, inTx)
	}
	return c.wrapStmt(s), nil
}

// PrepareContext forwards, or does what database/sql's ctxDriverPrepare does.
func (c *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if c.prepCtx != nil {
		if c.fresh {
			c.firstUse()
		}
		if err := c.refuseInTx(); err != nil {
			return nil, err
		}
		inTx := c.inTx()
		s, err := c.prepCtx.PrepareContext(ctx, query)
		if err != nil {
			return nil, c.handleErr(ctx, err, inTx)
		}
		return c.wrapStmt(s), nil
	}
	s, err := c.Prepare(query)
	if err == nil {
		select {
		default:
		case <-ctx.Done():
			s.Close()
			return nil, ctx.Err()
		}
	}
	return s, err
}

// Close closes the inner conn. database/sql calls it for a conn it
// discards, without IsValid when the conn failed with driver.ErrBadConn, so
// a checkout also ends here.
func (c *conn) Close() error {
	c.markBack(time.Now())
	c.c.stats.connsClosed.Add(1)
	c.c.track.remove(c)
	err := c.inner.Close()
	if c.deadPath.Load() || c.wire != nil && c.wire.dead.Load() {
		c.c.reap.enqueue(c.sess) // after the close: the session is no longer anyone's
	}
	return err
}

// Begin is required by driver.Conn; database/sql calls BeginTx.
func (c *conn) Begin() (driver.Tx, error) {
	if c.fresh {
		c.firstUse()
	}
	tx, err := c.inner.Begin() //lint:ignore SA1019 forwarding the required method
	if err != nil {
		return nil, c.handleErr(context.Background(), err, false)
	}
	return c.begin(tx), nil
}

// BeginTx forwards, or does what database/sql's ctxDriverBegin does.
func (c *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if c.beginTx != nil {
		if c.fresh {
			c.firstUse()
		}
		tx, err := c.beginTx.BeginTx(ctx, opts)
		if err != nil {
			// Nothing of the transaction ran yet, but BEGIN itself is
			// retried only when the driver proves it was not sent.
			return nil, c.handleErr(ctx, err, true)
		}
		return c.begin(tx), nil
	}
	return c.beginFallback(ctx, opts) // same checks and messages as database/sql
}

// ExecContext forwards, falls back to the legacy Execer as database/sql's
// ctxDriverExec does, or returns ErrSkip so database/sql prepares instead.
func (c *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if c.fresh {
		c.firstUse()
	}
	if err := c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := c.inTx()
	if c.execCtx != nil {
		r, err := c.execCtx.ExecContext(ctx, query, args)
		if err != nil {
			return nil, c.handleErr(ctx, err, inTx)
		}
		return r, nil
	}
	if c.execer == nil {
		return nil, driver.ErrSkip
	}
	dargs, err := namedValueToValue(args)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r, err := c.execer.Exec(query, dargs)
	if err != nil {
		return nil, c.handleErr(ctx, err, inTx)
	}
	return r, nil
}

// QueryContext forwards like ExecContext.
func (c *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if c.fresh {
		c.firstUse()
	}
	if err := c.refuseInTx(); err != nil {
		return nil, err
	}
	inTx := c.inTx()
	if c.queryCtx != nil {
		r, err := c.queryCtx.QueryContext(ctx, query, args)
		if err != nil {
			return nil, c.handleErr(ctx, err, inTx)
		}
		return c.wrapRows(r, inTx), nil
	}
	if c.queryer == nil {
		return nil, driver.ErrSkip
	}
	dargs, err := namedValueToValue(args)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r, err := c.queryer.Query(query, dargs)
	if err != nil {
		return nil, c.handleErr(ctx, err, inTx)
	}
	return c.wrapRows(r, inTx), nil
}

// CheckNamedValue forwards, or returns ErrSkip, which sends database/sql on
// to the statement's ColumnConverter and then its default conversion: the
// same path it takes when the conn has no NamedValueChecker.
func (c *conn) CheckNamedValue(nv *driver.NamedValue) error {
	if c.checker != nil {
		return c.checker.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

// Ping forwards; without an inner Pinger database/sql treats a conn it
// could obtain as alive, so nil is the equivalent.
func (c *conn) Ping(ctx context.Context) error {
	if c.fresh {
		c.firstUse()
	}
	if c.pinger == nil {
		return nil
	}
	if err := c.pinger.Ping(ctx); err != nil {
		return c.handleErr(ctx, err, false)
	}
	return nil
}

// namedValueToValue is database/sql's conversion for legacy drivers.
func namedValueToValue(named []driver.NamedValue) ([]driver.Value, error) {
	dargs := make([]driver.Value, len(named))
	for n, param := range named {
		if len(param.Name) > 0 {
			return nil, errors.New("sql: driver does not support the use of Named Parameters")
		}
		dargs[n] = param.Value
	}
	return dargs, nil
}

// UnwrapConn peels wrappers off a driver connection, as handed to the
// function given to sql.Conn.Raw, and returns the innermost one. It follows
// both Unwrap() driver.Conn (this package) and Raw() driver.Conn (otelsql),
// so it reaches pgx's *stdlib.Conn under any stack of such layers:
//
//	err := sqlConn.Raw(func(dc any) error {
//		pgxConn := resilientpg.UnwrapConn(dc).(*stdlib.Conn).Conn()
//		_, err := pgxConn.CopyFrom(ctx, pgx.Identifier{"t"}, cols, rows)
//		return err
//	})
func UnwrapConn(dc any) any {
	for range 64 { // bounded: a wrapper that returns itself must not hang us
		switch w := dc.(type) {
		case interface{ Unwrap() driver.Conn }:
			dc = w.Unwrap()
		case interface{ Raw() driver.Conn }:
			dc = w.Raw()
		default:
			return dc
		}
	}
	return dc
}
