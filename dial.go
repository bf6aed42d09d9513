package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
)

// One inner connect attempt, and the errors a waiting caller gets.

// dial makes one inner connection. With a source of credentials, a
// connect the server refuses after using credentials that were not
// fetched for it (a cached token or file, a call already running) is
// tried once more with fresh ones: they may have been rotated since. The
// refusal itself is an auth error, which never closes the gate.
func (c *Connector) dial(ctx context.Context) (driver.Conn, dialed, error) {
	if c.creds == nil {
		return c.dialOnce(ctx, nil)
	}
	use := &credUse{}
	ctx = context.WithValue(ctx, credKey{}, use)
	conn, d, err := c.dialOnce(ctx, use)
	if err != nil && use.reused && authRefused(err) && ctx.Err() == nil {
		c.creds.refreshes.Add(1)
		*use = credUse{stale: use.seq, force: true}
		conn, d, err = c.dialOnce(ctx, use)
	}
	return conn, d, err
}

// dialOnce makes one connect attempt. For a driver whose connection hides
// its socket (go-sql-driver/mysql), the dial hook hands the socket back
// through ctx, so that checkout can peek at it; the credentials hook hands
// back their expiry through use.
func (c *Connector) dialOnce(ctx context.Context, use *credUse) (driver.Conn, dialed, error) {
	c.gate.dials.Add(1)
	var d dialed
	if c.captureSock {
		ctx = context.WithValue(ctx, sockKey{}, &d.sock)
	}
	start := time.Now()
	d.start = start
	conn, err := c.inner.Connect(ctx)
	c.stats.connectNanos.Add(int64(time.Since(start)))
	err = ownTimeout(ctx, err)
	if err != nil {
		class := Classify(err)
		if isCredentialErr(err) {
			class = ClassAuth // whatever the function's error wraps: no server was asked
		}
		c.stats.connectFailures[class].Add(1)
		if c.ev.enabled(slog.LevelWarn) {
			c.ev.emit(evConnectFailed, slog.LevelWarn, "resilientpg: connect failed", errAttrs(err)...)
		}
	}
	if use != nil {
		d.expires = use.expires
	}
	return conn, d, err
}

// sockKey carries a *net.Conn from dial to the inner driver's dial hook.
type sockKey struct{}

// captureDial wraps a dial function so that it hands its socket, seen
// through a wireConn, to dialOnce.
func captureDial(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		wc := newWireConn(nc)
		if p, ok := ctx.Value(sockKey{}).(*net.Conn); ok {
			*p = wc
		}
		return wc, nil
	}
}

// waitErr is the error of a caller whose context ended while the server
// was down: both the context's error and the server's are in the chain.
func (c *Connector) waitErr(ctx context.Context, attempts int) error {
	c.gate.mu.Lock()
	last, since := c.gate.lastErr, c.gate.since
	c.gate.mu.Unlock()
	if last == nil {
		return context.Cause(ctx)
	}
	return &ServerDownError{Since: since, Attempts: attempts, Cause: context.Cause(ctx), Err: last}
}

// connectErr keeps driver.ErrBadConn out of Connect's result, as the
// driver.Connector contract requires: database/sql would take it for a
// failed pooled connection and retry.
func connectErr(err error) error {
	if errors.Is(err, driver.ErrBadConn) {
		return fmt.Errorf("resilientpg: connect: %s", err.Error())
	}
	return err
}
