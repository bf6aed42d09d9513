package resilientpg

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
)

// The session id a connection's handshake gives away: the MySQL greeting
// parse, and the connection wrapper that sniffs it.

// greeting builds a MySQL protocol-10 handshake packet.
func greeting(version string, id uint32) []byte {
	b := []byte{0, 0, 0, 0, 10}
	b = append(b, version...)
	b = append(b, 0, byte(id), byte(id>>8), byte(id>>16), byte(id>>24))
	b = append(b, "12345678"...) // the start of the auth data
	return b
}

func TestParseGreeting(t *testing.T) {
	g := greeting("5.5.5-10.11.6-MariaDB-0+deb12u1", 0x01020304)
	if id, ok := parseGreeting(g); !ok || id != 0x01020304 {
		t.Errorf("parseGreeting = %#x, %v; want 0x01020304, true", id, ok)
	}
	for n := range 40 { // every prefix short of the id is "not yet"
		if _, ok := parseGreeting(g[:n]); ok {
			t.Fatalf("parseGreeting of %d bytes says done", n)
		}
	}
	if id, ok := parseGreeting([]byte{0, 0, 0, 0, 0xff, 0x10, 0x04}); !ok || id != 0 {
		t.Errorf("an error packet: %d, %v; want 0, true", id, ok)
	}
}

// scriptConn hands out its data in the chunks given, then err.
type scriptConn struct {
	net.Conn
	chunks [][]byte
	err    error
}

func (s *scriptConn) Read(b []byte) (int, error) {
	if len(s.chunks) == 0 {
		return 0, s.err
	}
	n := copy(b, s.chunks[0])
	if s.chunks[0] = s.chunks[0][n:]; len(s.chunks[0]) == 0 {
		s.chunks = s.chunks[1:]
	}
	return n, nil
}

func (s *scriptConn) Write(b []byte) (int, error) { return 0, s.err }

// TestWireConnSniffs: the id is read from a greeting split over reads, the
// bytes reach the driver untouched, and only a dead-path error marks the
// connection.
func TestWireConnSniffs(t *testing.T) {
	g := greeting("8.0.36", 77)
	for _, tc := range []struct {
		err  error
		dead bool
	}{
		{&net.OpError{Op: "read", Err: syscall.ETIMEDOUT}, true},
		{&net.OpError{Op: "read", Err: syscall.EHOSTUNREACH}, true},
		{&net.OpError{Op: "read", Err: syscall.ECONNRESET}, false},
		{errors.New("EOF"), false},
	} {
		t.Run(fmt.Sprint(tc.err), func(t *testing.T) {
			w := newWireConn(&scriptConn{chunks: [][]byte{g[:3], g[3:9], g[9:]}, err: tc.err})
			var got []byte
			buf := make([]byte, 4)
			for range 20 {
				n, err := w.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					break
				}
			}
			if string(got) != string(g) {
				t.Errorf("the driver read %q, want %q", got, g)
			}
			if !w.greeted || w.id != 77 {
				t.Errorf("id = %d (greeted %v), want 77", w.id, w.greeted)
			}
			if w.dead.Load() != tc.dead {
				t.Errorf("dead = %v after %v, want %v", w.dead.Load(), tc.err, tc.dead)
			}
			w.dead.Store(false)
			w.Write([]byte("x"))
			if w.dead.Load() != tc.dead {
				t.Errorf("dead = %v after a write failing with %v, want %v", w.dead.Load(), tc.err, tc.dead)
			}
		})
	}
}
