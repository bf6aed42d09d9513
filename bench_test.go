//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package resilientpg

import (
	"context"
	"testing"
)

// fastPathConn is a wrapper over a pgx-like fake whose socket check peeks at
// a real loopback TCP socket, so the fast path pays its real syscall.
func fastPathConn(tb testing.TB) *conn {
	c, f := newFakeConnector(shapePgx, DefaultOptions())
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
}

// BenchmarkCheckoutFastPath measures ResetSession plus IsValid when no ping
// is due: the wrapper's whole per-query overhead.
func BenchmarkCheckoutFastPath(b *testing.B) {
	w := fastPathConn(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := w.ResetSession(ctx); err != nil {
			b.Fatal(err)
		}
		if !w.IsValid() {
			b.Fatal("invalid")
		}
	}
}
