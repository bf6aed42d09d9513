//go:build linux

package resilientpg

import (
	"context"
	"database/sql"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/stdlib"
)

// sockopts reads the TCP settings of a connected socket.
func sockopts(t *testing.T, nc net.Conn) (keepalive, idle, interval, count, userTimeoutMS int) {
	t.Helper()
	raw, err := nc.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	err = raw.Control(func(fd uintptr) {
		get := func(level, opt int) int {
			v, err := syscall.GetsockoptInt(int(fd), level, opt)
			if err != nil {
				t.Errorf("getsockopt %d: %v", opt, err)
			}
			return v
		}
		keepalive = get(syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
		idle = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
		interval = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL)
		count = get(syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT)
		userTimeoutMS = get(syscall.IPPROTO_TCP, tcpUserTimeout)
	})
	if err != nil {
		t.Fatal(err)
	}
	return
}

// TestDialerSocketOptions: the wrapper's dialer sets what the options say
// on the socket, before connect for the user timeout.
func TestDialerSocketOptions(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	for _, tc := range []struct {
		name                                string
		mod                                 func(*Options)
		keepalive, idle, intvl, count, utMS int
	}{
		{"defaults", nil, 1, 15, 5, 3, 30000},
		{"short", func(o *Options) {
			o.Keepalive = net.KeepAliveConfig{Enable: true, Idle: 2 * time.Second, Interval: time.Second, Count: 2}
			o.TCPUserTimeout = 1500 * time.Millisecond
		}, 1, 2, 1, 2, 1500},
		{"off", func(o *Options) { o.Keepalive = net.KeepAliveConfig{}; o.TCPUserTimeout = 0 }, 0, -1, -1, -1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := DefaultOptions()
			if tc.mod != nil {
				tc.mod(&o)
			}
			if err := o.validate(); err != nil {
				t.Fatal(err)
			}
			nc, err := dialer(&o).DialContext(context.Background(), "tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			ka, idle, intvl, count, ut := sockopts(t, nc)
			if ka != tc.keepalive || ut != tc.utMS || tc.keepalive == 1 && (idle != tc.idle || intvl != tc.intvl || count != tc.count) {
				t.Errorf("keepalive %d (%d s, %d s, %d), user timeout %d ms: want %d (%d, %d, %d), %d",
					ka, idle, intvl, count, ut, tc.keepalive, tc.idle, tc.intvl, tc.count, tc.utMS)
			}
		})
	}
}

// TestPgxDialsWithTheWrapperDialer: a connection of the resilientpg driver
// carries the DSN's TCP settings.
func TestPgxDialsWithTheWrapperDialer(t *testing.T) {
	srv := newWireServer(t, "never")
	db, err := sql.Open("resilientpg", srv.dsn()+"&resilient_keepalive=3s,2s,4&resilient_tcp_user_timeout=2500ms")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	sc, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	err = sc.Raw(func(dc any) error {
		nc := UnwrapConn(dc).(*stdlib.Conn).Conn().PgConn().Conn()
		ka, idle, intvl, count, ut := sockopts(t, nc)
		if ka != 1 || idle != 3 || intvl != 2 || count != 4 || ut != 2500 {
			t.Errorf("keepalive %d (%d s, %d s, %d), user timeout %d ms: want the DSN's 3s,2s,4 and 2500 ms", ka, idle, intvl, count, ut)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTCPKeys: the keys' spellings and their errors.
func TestTCPKeys(t *testing.T) {
	for _, tc := range []struct {
		dsn, wantErr string
		ka           net.KeepAliveConfig
		ut           time.Duration
	}{
		{"postgres://h/db?resilient_keepalive=off&resilient_tcp_user_timeout=0", "", net.KeepAliveConfig{}, 0},
		{"postgres://h/db?resilient_keepalive=10s,3s,5&resilient_tcp_user_timeout=20s", "",
			net.KeepAliveConfig{Enable: true, Idle: 10 * time.Second, Interval: 3 * time.Second, Count: 5}, 20 * time.Second},
		{"postgres://h/db?resilient_keepalive=10s", `invalid resilient_keepalive="10s": want off, or idle, interval and count`, net.KeepAliveConfig{}, 0},
		{"postgres://h/db?resilient_keepalive=10s,0s,3", `invalid resilient_keepalive="10s,0s,3"`, net.KeepAliveConfig{}, 0},
		{"postgres://h/db?resilient_keepalive=on", `invalid resilient_keepalive="on"`, net.KeepAliveConfig{}, 0},
		{"postgres://h/db?resilient_tcp_user_timeout=500us", `invalid resilient_tcp_user_timeout="500us": want a duration >= 1ms`, net.KeepAliveConfig{}, 0},
		{"postgres://h/db?resilient_tcp_user_timeout=-1s", `invalid resilient_tcp_user_timeout="-1s"`, net.KeepAliveConfig{}, 0},
	} {
		c, err := NewConnector(stdlib.GetDefaultDriver(), DefaultOptions(), tc.dsn)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err %v, want %q", tc.dsn, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.dsn, err)
			continue
		}
		if o := c.Options(); o.Keepalive != tc.ka || o.TCPUserTimeout != tc.ut {
			t.Errorf("%s: keepalive %+v, user timeout %v", tc.dsn, o.Keepalive, o.TCPUserTimeout)
		}
	}
	// A network registered with mysql.RegisterDialContext dials with its
	// own dialer too.
	mysql.RegisterDialContext("resilientpg_test_net", func(ctx context.Context, addr string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	})
	if _, err := sql.Open("resilientmysql", "u@resilientpg_test_net(h:3306)/db?resilient_keepalive=off"); err == nil ||
		!strings.Contains(err.Error(), "RegisterDialContext") {
		t.Errorf("changed TCP settings with a registered network: %v", err)
	}
	if _, err := sql.Open("resilientmysql", "u@resilientpg_test_net(h:3306)/db"); err != nil {
		t.Errorf("a registered network with the default TCP settings: %v", err)
	}
	// A connector built by the caller dials with its own dialer: changed
	// TCP settings cannot apply and are an error, not ignored.
	o := DefaultOptions()
	o.TCPUserTimeout = 5 * time.Second
	if _, err := NewConnector(&fakeConnector{}, o); err == nil || !strings.Contains(err.Error(), "resilient_tcp_user_timeout") {
		t.Errorf("changed TCP settings with a foreign connector: %v", err)
	}
}
