package resilientpg

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"io"
	"log"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/resilientpg/resilientpg/internal/eventlog"
)

// myWireServer is a MySQL server reduced to the handshake and COM_PING, on
// a loopback port, so that go-sql-driver/mysql can be made to log without a
// real server: it answers a connection's first ping and then closes it,
// the way a server ends an idle session (wait_timeout, KILL), so the
// driver's own liveness check at the next checkout finds EOF and logs
// "closing bad idle connection: EOF".
type myWireServer struct {
	ln     net.Listener
	wg     sync.WaitGroup
	conns  atomic.Int64
	closed chan struct{} // one value per connection the server ended
}

func newMyWireServer(t *testing.T) *myWireServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &myWireServer{ln: ln, closed: make(chan struct{}, 16)}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *myWireServer) accept() {
	defer s.wg.Done()
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer nc.Close()
			_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
			if s.serve(nc, uint32(s.conns.Add(1))) {
				nc.Close()
				s.closed <- struct{}{}
			}
		}()
	}
}

// serve speaks the protocol until the connection's first COM_PING is
// answered; it reports whether it got that far.
func (s *myWireServer) serve(nc net.Conn, id uint32) bool {
	const (
		clientLongPassword = 1 << 0
		clientProtocol41   = 1 << 9
		clientTransactions = 1 << 13
		clientSecureConn   = 1 << 15
		clientPluginAuth   = 1 << 19
		caps               = clientLongPassword | clientProtocol41 | clientTransactions | clientSecureConn | clientPluginAuth
	)
	var hs bytes.Buffer
	hs.WriteByte(10) // protocol version
	hs.WriteString("10.11.0-fake\x00")
	hs.Write(binary.LittleEndian.AppendUint32(nil, id))
	hs.WriteString("abcdefgh\x00") // scramble, first part, and filler
	hs.Write(binary.LittleEndian.AppendUint16(nil, caps&0xffff))
	hs.WriteByte(45)       // utf8mb4_general_ci
	hs.Write([]byte{2, 0}) // status: autocommit
	hs.Write(binary.LittleEndian.AppendUint16(nil, caps>>16))
	hs.WriteByte(21)                   // scramble length
	hs.Write(make([]byte, 10))         // reserved
	hs.WriteString("ijklmnopqrst\x00") // scramble, second part
	hs.WriteString("mysql_native_password\x00")
	ok := []byte{0, 0, 0, 2, 0, 0, 0} // OK: no rows, no id, autocommit, no warnings
	if writePacket(nc, 0, hs.Bytes()) != nil {
		return false
	}
	if _, _, err := readPacket(nc); err != nil { // the handshake response
		return false
	}
	if writePacket(nc, 2, ok) != nil {
		return false
	}
	for {
		seq, cmd, err := readPacket(nc)
		if err != nil || len(cmd) == 0 {
			return false
		}
		switch cmd[0] {
		case 0x0e: // COM_PING
			return writePacket(nc, seq+1, ok) == nil
		default: // COM_QUIT, or a command this fake does not speak
			return false
		}
	}
}

func writePacket(w io.Writer, seq byte, payload []byte) error {
	hdr := []byte{byte(len(payload)), byte(len(payload) >> 8), byte(len(payload) >> 16), seq}
	_, err := w.Write(append(hdr, payload...))
	return err
}

func readPacket(r io.Reader) (byte, []byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	body := make([]byte, int(hdr[0])|int(hdr[1])<<8|int(hdr[2])<<16)
	_, err := io.ReadFull(r, body)
	return hdr[3], body, err
}

// myNoPeekNet is a network registered with the driver, so the wrapper
// keeps its hands off the socket (no peek at checkout) and the driver's own
// liveness check is the one that finds the closed connection.
const myNoPeekNet = "resilientpg_test_nopeek"

var registerNoPeek sync.Once

// driverLogRun pings db twice on a server that ends each connection after
// its first ping, so that the second checkout finds its connection closed
// by the server, and checks that database/sql replaced it.
func driverLogRun(t *testing.T, db *sql.DB, srv *myWireServer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	if err := db.PingContext(ctx); err != nil {
		t.Fatalf("first ping: %v", err)
	}
	select {
	case <-srv.closed:
	case <-ctx.Done():
		t.Fatal("the server never ended the first connection")
	}
	time.Sleep(20 * time.Millisecond) // the FIN reaches the client socket
	if err := db.PingContext(ctx); err != nil {
		t.Fatalf("second ping (on a new connection after the dead one): %v", err)
	}
	if n := srv.conns.Load(); n != 2 {
		t.Fatalf("%d connections reached the server, want 2: the dead one was not replaced", n)
	}
}

// TestMySQLDriverLogThroughConnector: go-sql-driver/mysql's own log lines
// reach Options.Logger as driver.log records at debug, through the logger
// the connector sets on the driver's config (not the package-wide one);
// with logging off they reach neither the driver's package-wide logger
// (stderr by default) nor slog.Default. A bare mysql pool on the same
// server is the control: its line does reach the package-wide logger.
func TestMySQLDriverLogThroughConnector(t *testing.T) {
	registerNoPeek.Do(func() {
		mysql.RegisterDialContext(myNoPeekNet, func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		})
	})
	// Whatever reaches the driver's package-wide logger or slog.Default is
	// kept here; the package-wide logger is restored to the driver's
	// default (stderr) afterwards.
	var global syncBuffer
	if err := mysql.SetLogger(log.New(&global, "[mysql] ", 0)); err != nil {
		t.Fatal(err)
	}
	defer mysql.SetLogger(log.New(os.Stderr, "[mysql] ", log.Ldate|log.Ltime))
	quiet := &eventlog.Recorder{}
	prev := slog.Default()
	slog.SetDefault(slog.New(quiet))
	defer slog.SetDefault(prev)

	const line = "closing bad idle connection: EOF"

	t.Run("bare-driver-control", func(t *testing.T) {
		global.Reset()
		srv := newMyWireServer(t)
		db, err := sql.Open("mysql", "u@"+myNoPeekNet+"("+srv.ln.Addr().String()+")/db")
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		driverLogRun(t, db, srv)
		if !strings.Contains(global.String(), line) {
			t.Fatalf("the bare driver did not log %q to its package-wide logger (got %q): the scenario no longer makes it log", line, global.String())
		}
	})

	t.Run("debug", func(t *testing.T) {
		global.Reset()
		srv := newMyWireServer(t)
		o, rec := logged(LogDebug, nil)
		c, err := NewConnector(&mysql.MySQLDriver{}, o, "u@"+myNoPeekNet+"("+srv.ln.Addr().String()+")/db")
		if err != nil {
			t.Fatal(err)
		}
		db := sql.OpenDB(c)
		defer db.Close()
		driverLogRun(t, db, srv)
		var got []eventlog.Record
		for _, r := range rec.Events("driver.log") {
			if strings.Contains(r.Msg, line) {
				got = append(got, r)
			}
		}
		if len(got) != 1 {
			t.Fatalf("%d driver.log records with %q, want 1; all records: %+v", len(got), line, rec.All())
		}
		if got[0].Level != slog.LevelDebug || got[0].Attrs["driver"].String() != "go-sql-driver/mysql" ||
			got[0].Attrs["db.system.name"].String() != "mysql" {
			t.Errorf("driver.log record %+v", got[0])
		}
		if s := c.Stats(); s.Discards[DiscardDriverReset] != 1 || s.Discards.Total() != 1 {
			t.Errorf("discards %v, want one driver_reset (the driver's own check refused the dead connection)", s.Discards)
		}
		if global.Len() != 0 || len(quiet.All()) != 0 {
			t.Errorf("with Options.Logger set, lines also went to the package-wide logger (%q) or slog.Default (%d records)",
				global.String(), len(quiet.All()))
		}
	})

	t.Run("dsn-debug-to-slog-default", func(t *testing.T) {
		// resilient_log=debug in the DSN and no Options.Logger: the lines
		// go to slog.Default, still not to the package-wide logger.
		global.Reset()
		before := len(quiet.Events("driver.log"))
		srv := newMyWireServer(t)
		db, err := sql.Open("resilientmysql", "u@"+myNoPeekNet+"("+srv.ln.Addr().String()+")/db?resilient_log=debug")
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		driverLogRun(t, db, srv)
		n := 0
		for _, r := range quiet.Events("driver.log")[before:] {
			if strings.Contains(r.Msg, line) && r.Level == slog.LevelDebug {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%d driver.log records with %q on slog.Default, want 1", n, line)
		}
		if global.Len() != 0 {
			t.Errorf("the package-wide logger got %q", global.String())
		}
	})

	t.Run("off", func(t *testing.T) {
		global.Reset()
		before := len(quiet.All())
		srv := newMyWireServer(t)
		c, err := NewConnector(&mysql.MySQLDriver{}, opts(nil), "u@"+myNoPeekNet+"("+srv.ln.Addr().String()+")/db")
		if err != nil {
			t.Fatal(err)
		}
		db := sql.OpenDB(c)
		defer db.Close()
		driverLogRun(t, db, srv)
		if s := c.Stats(); s.Discards[DiscardDriverReset] != 1 {
			t.Fatalf("discards %v, want one driver_reset: the driver's check did not run, so it had nothing to log", s.Discards)
		}
		if global.Len() != 0 {
			t.Errorf("logging off, yet the driver's package-wide logger (stderr by default) got %q", global.String())
		}
		if recs := quiet.All()[before:]; len(recs) != 0 {
			t.Errorf("logging off, yet slog.Default got %d records: %+v", len(recs), recs)
		}
	})

	t.Run("handshake-eof", func(t *testing.T) {
		// Another of the driver's lines, on a connect: a server that
		// accepts and hangs up before its greeting. The driver logs the
		// read error (packets.go) before it returns ErrInvalidConn.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				nc, err := ln.Accept()
				if err != nil {
					return
				}
				nc.Close()
			}
		}()
		o, rec := logged(LogDebug, func(o *Options) { o.ConnectWait = 0 })
		c, err := NewConnector(&mysql.MySQLDriver{}, o, "u@tcp("+ln.Addr().String()+")/db")
		if err != nil {
			t.Fatal(err)
		}
		db := sql.OpenDB(c)
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := db.PingContext(ctx); err == nil {
			t.Fatal("ping of a server that hangs up succeeded")
		}
		recs := rec.Events("driver.log")
		if len(recs) == 0 || !strings.Contains(recs[0].Msg, "packets.go") {
			t.Fatalf("driver.log records %+v, want the driver's packets.go line on the hang-up", recs)
		}
		if recs[0].Attrs["server.address"].String() != "127.0.0.1" || recs[0].Level != slog.LevelDebug {
			t.Errorf("driver.log record %+v", recs[0])
		}
	})
}

// syncBuffer is a bytes.Buffer safe for the driver's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func (b *syncBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Len()
}

func (b *syncBuffer) Reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b.Reset()
}
