package resilientpg

import (
	"context"
	"database/sql"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// wireServer is a PostgreSQL backend reduced to the simple query protocol,
// on a loopback port, for the one case no real server produces on demand:
// a statement that reaches the server, which then goes away before it
// answers (an immediate shutdown caught between executing and replying).
// It answers every query with its command tag, except one that starts
// with dieOn: that one it counts, answers with the WARNING an immediate
// shutdown sends, and closes the connection.
type wireServer struct {
	ln    net.Listener
	dieOn string

	mu      sync.Mutex
	queries []string // every query received, in order, over all connections
	wg      sync.WaitGroup
}

func newWireServer(t *testing.T, dieOn string) *wireServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &wireServer{ln: ln, dieOn: dieOn}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *wireServer) dsn() string {
	return "postgres://u@" + s.ln.Addr().String() + "/db?sslmode=disable"
}

func (s *wireServer) accept() {
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
			_ = nc.SetDeadline(time.Now().Add(10 * time.Second)) // bounded whatever the client does
			s.serve(nc)
		}()
	}
}

func (s *wireServer) serve(nc net.Conn) {
	be := pgproto3.NewBackend(nc, nc)
	if _, err := be.ReceiveStartupMessage(); err != nil {
		return
	}
	be.Send(&pgproto3.AuthenticationOk{})
	be.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"})
	be.Send(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{0, 0, 0, 1}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if be.Flush() != nil {
		return
	}
	status := byte('I')
	for {
		msg, err := be.Receive()
		if err != nil {
			return
		}
		q, ok := msg.(*pgproto3.Query)
		if !ok {
			return // Terminate, or a protocol this fake does not speak
		}
		s.mu.Lock()
		s.queries = append(s.queries, q.String)
		s.mu.Unlock()
		word := strings.ToUpper(strings.Fields(q.String)[0])
		if strings.HasPrefix(q.String, s.dieOn) {
			be.Send(&pgproto3.NoticeResponse{Severity: "WARNING", SeverityUnlocalized: "WARNING", Code: "57P01",
				Message: "terminating connection due to immediate shutdown command"})
			_ = be.Flush()
			return
		}
		switch word {
		case "BEGIN":
			status = 'T'
		case "COMMIT", "ROLLBACK":
			status = 'I'
		}
		be.Send(&pgproto3.CommandComplete{CommandTag: []byte(word)})
		be.Send(&pgproto3.ReadyForQuery{TxStatus: status})
		if be.Flush() != nil {
			return
		}
	}
}

func (s *wireServer) count(prefix string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, q := range s.queries {
		if strings.HasPrefix(q, prefix) {
			n++
		}
	}
	return n
}

// TestStatementLostAfterSendIsNotRetried: a statement without arguments
// goes by pgx's simple protocol. When the server received it and then went
// away, pgx before v5.13.0 reported "conn closed" as safe to retry, stdlib
// turned that into driver.ErrBadConn, and database/sql ran the statement
// again on new connections: a write executed up to three times. The
// wrapper must let it run once and say it may have run.
func TestStatementLostAfterSendIsNotRetried(t *testing.T) {
	srv := newWireServer(t, "UPDATE")
	db, err := sql.Open("resilientpg", srv.dsn())
	require.NoError(t, err)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, err = db.ExecContext(ctx, "UPDATE counters SET n = n + 1")
	require.Error(t, err)
	assert.Equal(t, 1, srv.count("UPDATE"), "the server received the statement this many times")
	var se *StatementError
	require.ErrorAs(t, err, &se, "%v", err)
	assert.Equal(t, ReasonMayHaveRun, se.Reason, "%v", err)
	assert.Contains(t, err.Error(), "WithIdempotent")
	s, _ := StatsOf(db)
	assert.Zero(t, s.Retries[ReasonNotSent], "retries counted as not sent")
}

// TestCommitLostAfterSendIsUnknown: the same loss at COMMIT. Before pgx
// v5.13.0 the guard saw "conn closed, safe to retry" and RunTx ran the
// transaction again: the write of a transaction that had committed was
// committed twice (the fault suite's tx-writes-outage-3s found one such
// duplicate in about 11,700 transactions).
func TestCommitLostAfterSendIsUnknown(t *testing.T) {
	srv := newWireServer(t, "commit")
	db, err := sql.Open("resilientpg", srv.dsn())
	require.NoError(t, err)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	runs := 0
	err = RunTx(ctx, db, nil, func(ctx context.Context, tx *sql.Tx) error {
		runs++
		_, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)")
		return err
	})
	require.ErrorIs(t, err, ErrCommitUnknown, "%v", err)
	assert.False(t, errors.Is(err, ErrTxAborted), "%v", err)
	assert.Equal(t, 1, runs, "fn ran this many times")
	assert.Equal(t, 1, srv.count("commit"), "COMMIT reached the server this many times")
	assert.Equal(t, 1, srv.count("INSERT"), "the INSERT reached the server this many times")
	s, _ := StatsOf(db)
	assert.EqualValues(t, 1, s.TxCommitUnknown)
	assert.EqualValues(t, 1, s.TxAttempts)
}
