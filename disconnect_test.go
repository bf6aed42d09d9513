package resilientpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
)

type pqLikeError struct{ code string }

func (e pqLikeError) Error() string    { return "pq: " + e.code }
func (e pqLikeError) SQLState() string { return e.code }

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func TestClassify(t *testing.T) {
	pg := func(code string) error { return &pgconn.PgError{Severity: "FATAL", Code: code} }
	my := func(n uint16, msg string) error { return &mysql.MySQLError{Number: n, Message: msg} }
	opErr := func(op string, err error) error {
		return &net.OpError{Op: op, Net: "tcp", Err: os.NewSyscallError("syscall", err)}
	}
	cases := []struct {
		name string
		err  error
		want Class
	}{
		{"nil", nil, ClassNone},
		{"plain", errors.New("syntax error"), ClassOther},
		{"pg unique violation", pg("23505"), ClassOther},
		{"ctx canceled", context.Canceled, ClassCanceled},
		{"ctx deadline", context.DeadlineExceeded, ClassCanceled},
		{"ctx deadline under a net timeout", fmt.Errorf("read: %w", errors.Join(timeoutError{}, context.DeadlineExceeded)), ClassCanceled},
		{"pg 08006 connection_failure", pg("08006"), ClassConnLost},
		{"pg 08003 connection_does_not_exist", pg("08003"), ClassConnLost},
		{"pg 08P01 protocol_violation", pg("08P01"), ClassConnLost},
		{"pg 08001 unable to establish", pg("08001"), ClassCannotConnect},
		{"pg 08004 rejected", pg("08004"), ClassCannotConnect},
		{"pg 57P01 admin_shutdown", pg("57P01"), ClassShutdown},
		{"pg 57P02 crash_shutdown", pg("57P02"), ClassShutdown},
		{"pg 57P03 cannot_connect_now", pg("57P03"), ClassCannotConnect},
		{"pg 53300 too_many_connections", pg("53300"), ClassCannotConnect},
		{"pg 57P05 idle_session_timeout", pg("57P05"), ClassSessionTimeout},
		{"pg 25P03 idle_in_transaction_timeout", pg("25P03"), ClassSessionTimeout},
		{"pg 25006 read_only", pg("25006"), ClassReadOnly},
		{"pg 40001 serialization", pg("40001"), ClassSerialization},
		{"pg 40P01 deadlock", pg("40P01"), ClassSerialization},
		{"pg 28P01 password", pg("28P01"), ClassAuth},
		{"pg 28000 authorization", pg("28000"), ClassAuth},
		{"pg 3D000 no database", pg("3D000"), ClassAuth},
		{"pq-style SQLState 57P01", pqLikeError{"57P01"}, ClassShutdown},
		{"pq-style SQLState 08006", pqLikeError{"08006"}, ClassConnLost},
		{"mysql 1053 shutdown", my(1053, "Server shutdown in progress"), ClassShutdown},
		{"mariadb 1927 killed", my(1927, "Connection was killed"), ClassShutdown},
		{"mysql 1040 too many", my(1040, "Too many connections"), ClassCannotConnect},
		{"mysql 4031 inactivity", my(4031, "The client was disconnected by the server because of inactivity."), ClassSessionTimeout},
		{"mariadb 4031 is something else", my(4031, "Referenced trigger does not exist"), ClassOther},
		{"mysql 1290 read_only", my(1290, "--read-only"), ClassReadOnly},
		{"mysql 1792 read-only tx", my(1792, ""), ClassReadOnly},
		{"mysql 1836 read-only mode", my(1836, ""), ClassReadOnly},
		{"mysql 1213 deadlock", my(1213, ""), ClassSerialization},
		{"mysql 1205 lock wait", my(1205, ""), ClassSerialization},
		{"mysql 1045 access denied", my(1045, ""), ClassAuth},
		{"mysql 1049 unknown db", my(1049, ""), ClassAuth},
		{"mysql 1064 syntax", my(1064, ""), ClassOther},
		{"mysql invalid connection", mysql.ErrInvalidConn, ClassConnLost},
		{"driver.ErrBadConn", driver.ErrBadConn, ClassConnLost},
		{"io.EOF", io.EOF, ClassConnLost},
		{"unexpected EOF", io.ErrUnexpectedEOF, ClassConnLost},
		{"net.ErrClosed", net.ErrClosed, ClassConnLost},
		{"pgconn conn closed", pgconn.ErrConnClosed, ClassConnLost}, // pgx: the connection was closed after an earlier failure
		{"ECONNRESET", opErr("read", syscall.ECONNRESET), ClassConnLost},
		{"EPIPE", opErr("write", syscall.EPIPE), ClassConnLost},
		{"ETIMEDOUT", opErr("read", syscall.ETIMEDOUT), ClassConnLost},
		{"ECONNREFUSED", opErr("dial", syscall.ECONNREFUSED), ClassCannotConnect},
		{"EHOSTUNREACH", opErr("dial", syscall.EHOSTUNREACH), ClassCannotConnect},
		{"EHOSTUNREACH on an open connection", opErr("read", syscall.EHOSTUNREACH), ClassConnLost},
		{"ENETUNREACH on a write", opErr("write", syscall.ENETUNREACH), ClassConnLost},
		{"DNS failure", &net.OpError{Op: "dial", Err: &net.DNSError{Err: "no such host", Name: "db"}}, ClassCannotConnect},
		{"driver read timeout", &net.OpError{Op: "read", Err: timeoutError{}}, ClassConnLost},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, err := range []error{tc.err, wrap(tc.err)} {
				if got := Classify(err); got != tc.want {
					t.Errorf("Classify(%v) = %v, want %v", err, got, tc.want)
				}
				want := tc.want == ClassConnLost || tc.want == ClassShutdown || tc.want == ClassSessionTimeout
				if got := IsDisconnect(err); got != want {
					t.Errorf("IsDisconnect(%v) = %v, want %v", err, got, want)
				}
			}
		})
	}
}

// wrap wraps err twice, as applications and drivers do, so the test
// exercises the unwrapping.
func wrap(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("handler: %w", fmt.Errorf("query failed: %w", err))
}

// TestClassifyRealDialError: the error a real refused dial produces.
func TestClassifyRealDialError(t *testing.T) {
	for range 5 { // a freed port may be taken again; try a few
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if _, err = net.Dial("tcp", addr); err == nil {
			continue
		}
		if got := Classify(wrap(err)); got != ClassCannotConnect {
			t.Fatalf("Classify(%v) = %v, want cannot connect", err, got)
		}
		return
	}
	t.Fatal("could not get a refused dial on loopback")
}

func TestServerWide(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&pgconn.PgError{Code: "57P02"}, true},
		{&pgconn.PgError{Code: "57P01"}, false}, // also pg_terminate_backend
		{&mysql.MySQLError{Number: 1053}, true},
		{&mysql.MySQLError{Number: 1927}, false}, // also KILL
		{io.EOF, false},
	} {
		if _, got := serverWide(wrap(tc.err)); got != tc.want {
			t.Errorf("serverWide(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if got := Class(200).String(); got != "Class(200)" {
		t.Errorf("unknown class prints %q", got)
	}
}
