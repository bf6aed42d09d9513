//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package resilientpg

import (
	"context"
	"errors"
	"testing"
	"time"
)

// fastPathConn is a wrapper over a pgx-like fake whose socket check peeks at
// a real loopback TCP socket, so the fast path pays its real syscall.
func fastPathConn(tb testing.TB) *conn { return fastPathConnWith(tb, DefaultOptions()) }

func fastPathConnWith(tb testing.TB, o Options) *conn {
	c, f := newFakeConnector(shapePgx, o)
	w, _ := connect(c, f)
	client, _ := tcpPair(tb)
	w.sock = newSockCheck(client)
	return w
}

// TestCheckoutFastPathAllocs: a checkout with no ping due and the return
// after it allocate nothing (errors are built only on failure paths).
func TestCheckoutFastPathAllocs(t *testing.T) {
	w := fastPathConn(t)
	ctx := context.Background()
	n := testing.AllocsPerRun(1000, func() {
		w.lastActive = w.lastActive.Add(-2 * peekAfterIdle) // take the peek path too
		if err := w.ResetSession(ctx); err != nil {
			t.Fatal(err)
		}
		if !w.IsValid() {
			t.Fatal("invalid")
		}
	})
	if n != 0 {
		t.Fatalf("checkout+return fast path allocates %v times, want 0", n)
	}
	// With leak detection on, the borrower's stack goes into the
	// connection's preallocated array: still nothing allocated.
	o := DefaultOptions()
	o.LeakThreshold = time.Hour
	w = fastPathConnWith(t, o)
	defer w.c.Close()
	if n := testing.AllocsPerRun(1000, func() {
		if err := w.ResetSession(ctx); err != nil || !w.IsValid() {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("with leak detection on, checkout+return allocates %v times, want 0", n)
	}
}

// BenchmarkCheckoutFastPath measures ResetSession plus IsValid when no ping
// is due: the wrapper's whole per-query overhead. "reused" is a connection
// checked out again at once (under load); "idle" one idle past
// peekAfterIdle, which pays the socket peek.
func BenchmarkCheckoutFastPath(b *testing.B) {
	for _, idle := range []bool{false, true} {
		name := map[bool]string{false: "reused", true: "idle"}[idle]
		b.Run(name, func(b *testing.B) {
			w := fastPathConn(b)
			benchCheckout(b, w, idle)
		})
	}
	// Leak detection on: the cost of capturing the borrower's stack.
	o := DefaultOptions()
	o.LeakThreshold = time.Hour
	b.Run("reused-leak-detection", func(b *testing.B) {
		w := fastPathConnWith(b, o)
		defer w.c.Close()
		benchCheckout(b, w, false)
	})
}

func benchCheckout(b *testing.B, w *conn, idle bool) {
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if idle {
			w.lastActive = w.lastActive.Add(-2 * peekAfterIdle)
		}
		if err := w.ResetSession(ctx); err != nil {
			b.Fatal(err)
		}
		if !w.IsValid() {
			b.Fatal("invalid")
		}
	}
}

// TestCheckoutPeekThreshold: a connection the server closed is discarded
// at checkout once it has been idle peekAfterIdle, without a ping; one
// reused at once is not peeked.
func TestCheckoutPeekThreshold(t *testing.T) {
	c, f := newFakeConnector(shapePgx, opts(func(o *Options) { o.Ping = PingNever }))
	w, fc := connect(c, f)
	client, server := tcpPair(t)
	w.sock = newSockCheck(client)
	server.Close()
	if waitState(w.sock, sockClosed) != sockClosed {
		t.Fatal("the close did not arrive")
	}
	ctx := context.Background()
	w.lastActive = time.Now()
	if err := w.ResetSession(ctx); err != nil {
		t.Fatalf("reused at once: %v, want no peek", err)
	}
	w.lastActive = time.Now().Add(-peekAfterIdle)
	if err := w.ResetSession(ctx); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("idle %v: %v, want ErrServerClosed", peekAfterIdle, err)
	}
	if fc.pings.Load() != 0 {
		t.Error("the peek path pinged")
	}
}
