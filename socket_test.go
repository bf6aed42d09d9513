//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package resilientpg

import (
	"net"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		done <- c
	}()
	cc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc := <-done
	if sc == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { cc.Close(); sc.Close() })
	return cc.(*net.TCPConn), sc.(*net.TCPConn)
}

// waitState polls, bounded, until the kernel has delivered what the peer did.
func waitState(s *sockCheck, want sockState) sockState {
	var got sockState
	for range 200 {
		if got = s.check(); got == want {
			return got
		}
		time.Sleep(5 * time.Millisecond)
	}
	return got
}

func TestSockCheck(t *testing.T) {
	cases := []struct {
		name string
		peer func(*net.TCPConn)
		want sockState
	}{
		{"idle", func(*net.TCPConn) {}, sockAlive},
		{"notification pending", func(s *net.TCPConn) { s.Write([]byte("A\x00\x00\x00\x05x")) }, sockPending},
		{"farewell error pending", func(s *net.TCPConn) { s.Write([]byte("E\x00\x00\x00\x05x")) }, sockFatal},
		{"closed by peer", func(s *net.TCPConn) { s.Close() }, sockClosed},
		{"reset by peer", func(s *net.TCPConn) { s.SetLinger(0); s.Close() }, sockClosed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			s := newSockCheck(client)
			if s == nil {
				t.Fatal("no sockCheck for a TCP conn")
			}
			tc.peer(server)
			if got := waitState(s, tc.want); got != tc.want {
				t.Fatalf("state = %d, want %d", got, tc.want)
			}
			if tc.want == sockPending || tc.want == sockFatal {
				// The peek must not consume: the driver still reads the byte.
				buf := make([]byte, 1)
				client.SetReadDeadline(time.Now().Add(time.Second))
				if _, err := client.Read(buf); err != nil || buf[0] != map[sockState]byte{sockPending: 'A', sockFatal: 'E'}[tc.want] {
					t.Fatalf("byte after peek = %q, err %v", buf, err)
				}
			}
		})
	}
	t.Run("closed locally", func(t *testing.T) {
		client, _ := tcpPair(t)
		s := newSockCheck(client)
		client.Close()
		if got := s.check(); got != sockClosed {
			t.Fatalf("state = %d, want closed", got)
		}
	})
	t.Run("not a socket", func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		if newSockCheck(a) != nil {
			t.Fatal("net.Pipe has no descriptor; want nil check")
		}
	})
}

func TestSockCheckAllocs(t *testing.T) {
	client, _ := tcpPair(t)
	s := newSockCheck(client)
	if n := testing.AllocsPerRun(1000, func() { s.check() }); n != 0 {
		t.Fatalf("sockCheck.check allocates %v times per call, want 0", n)
	}
}
