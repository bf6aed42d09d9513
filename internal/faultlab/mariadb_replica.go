package faultlab

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"
)

// MariaDBPair is a MariaDB primary with one GTID replica (read_only=1),
// both with binary logs, for failovers of the Aurora/RDS kind: the
// replica is promoted and an Endpoint is moved to it. Node(0) is the first
// primary, Node(1) the first replica, whatever their roles are now.
type MariaDBPair struct {
	nodes [2]*MariaDB

	mu      sync.Mutex
	primary int
}

// StartMariaDBPair starts two servers (server_id 1 and 2, row-based binary
// logs, opts.ExtraArgs on both), makes the second replicate from the first
// by GTID starting at the first's current position, and returns once the
// replica's threads run. On failure nothing is left behind. Call Close
// when done.
func StartMariaDBPair(ctx context.Context, opts MariaDBOptions) (*MariaDBPair, error) {
	r := &MariaDBPair{}
	ok := false
	defer func() {
		if !ok {
			r.Close()
		}
	}()
	for i := range r.nodes {
		o := opts
		o.ExtraArgs = append([]string{
			"--server-id=" + strconv.Itoa(i+1),
			"--log-bin=mariadb-bin", "--binlog-format=ROW", "--log-slave-updates",
		}, opts.ExtraArgs...)
		m, err := StartMariaDB(ctx, o)
		if err != nil {
			return nil, err
		}
		r.nodes[i] = m
	}
	if err := r.nodes[1].replicateFrom(ctx, r.nodes[0]); err != nil {
		return nil, err
	}
	ok = true
	return r, nil
}

// Node returns node i (0 or 1).
func (r *MariaDBPair) Node(i int) *MariaDB { return r.nodes[i] }

// Primary returns the current primary.
func (r *MariaDBPair) Primary() *MariaDB {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nodes[r.primary]
}

// Replica returns the node that is not the current primary.
func (r *MariaDBPair) Replica() *MariaDB {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nodes[1-r.primary]
}

// Close stops both servers and removes their directories.
func (r *MariaDBPair) Close() error {
	var errs []error
	for _, n := range r.nodes {
		if n != nil {
			errs = append(errs, n.Close())
		}
	}
	return errors.Join(errs...)
}

// replicateFrom makes m a read-only GTID replica of primary. Both servers
// ran the same setup (accounts, database "test"), so m starts at the
// primary's current GTID position rather than replaying that setup.
func (m *MariaDB) replicateFrom(ctx context.Context, primary *MariaDB) error {
	pos, err := primary.queryString(ctx, "SELECT @@GLOBAL.gtid_binlog_pos")
	if err != nil {
		return err
	}
	q := fmt.Sprintf("SET GLOBAL read_only = ON; STOP SLAVE; RESET SLAVE ALL; SET GLOBAL gtid_slave_pos = '%s';"+
		"CHANGE MASTER TO MASTER_HOST = '%s', MASTER_PORT = %d, MASTER_USER = '%s', MASTER_USE_GTID = slave_pos,"+
		" MASTER_CONNECT_RETRY = 1; START SLAVE", pos, loopbackHost, primary.Port, mariadbAdminUser)
	if err := m.Exec(ctx, q); err != nil {
		return err
	}
	err = poll(ctx, 250, 20*time.Millisecond, 10*time.Second, "wait for the replica threads of "+m.Addr(),
		func(ctx context.Context) error {
			st, err := m.slaveStatus(ctx)
			if err != nil {
				return err
			}
			if st["Slave_IO_Running"] != "Yes" || st["Slave_SQL_Running"] != "Yes" {
				return fmt.Errorf("IO %s, SQL %s: %s %s", st["Slave_IO_Running"], st["Slave_SQL_Running"],
					st["Last_IO_Error"], st["Last_SQL_Error"])
			}
			return nil
		})
	if err != nil {
		return withLog(err, m.errLogPath())
	}
	m.logf("faultlab: mariadb %s replicates from %s from GTID %s", m.Addr(), primary.Addr(), pos)
	return nil
}

// CatchUp waits until the replica has applied everything the primary has
// logged so far (MASTER_GTID_WAIT), bounded by ctx and 10 s.
func (r *MariaDBPair) CatchUp(ctx context.Context) error {
	primary, replica := r.Primary(), r.Replica()
	pos, err := primary.queryString(ctx, "SELECT @@GLOBAL.gtid_binlog_pos")
	if err != nil {
		return err
	}
	got, err := replica.queryString(ctx, fmt.Sprintf("SELECT MASTER_GTID_WAIT('%s', 10)", pos))
	if err != nil {
		return err
	}
	if got != "0" {
		return fmt.Errorf("faultlab: replica %s did not reach GTID %s within 10 s", replica.Addr(), pos)
	}
	return nil
}

// Promote makes the replica the primary: stops replication, forgets its
// source and turns read_only off. The old primary is left as it is (set
// it read-only, stop it, or move an Endpoint away from it yourself); call
// CatchUp first if it must not lose the primary's latest writes.
func (r *MariaDBPair) Promote(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.nodes[1-r.primary]
	if err := m.Exec(ctx, "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF"); err != nil {
		return err
	}
	r.primary = 1 - r.primary
	return nil
}

// slaveStatus returns SHOW SLAVE STATUS as column name to value.
func (m *MariaDB) slaveStatus(ctx context.Context) (map[string]string, error) {
	db, err := m.adminDB(m.adminUser)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, "SHOW SLAVE STATUS")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return nil, err
	}
	if !rows.Next() {
		return nil, errors.New("no replication configured")
	}
	vals := make([]sql.NullString, len(cols))
	ptrs := make([]any, len(cols))
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	if err := rows.Scan(ptrs...); err != nil {
		return nil, err
	}
	out := make(map[string]string, len(cols))
	for i, c := range cols {
		out[c] = vals[i].String
	}
	return out, rows.Err()
}

// queryString runs a one-value query as the admin account.
func (m *MariaDB) queryString(ctx context.Context, q string) (string, error) {
	ctx, cancel := withDeadline(ctx, defaultOpTimeout)
	defer cancel()
	db, err := m.adminDB(m.adminUser)
	if err != nil {
		return "", err
	}
	defer db.Close()
	var v sql.NullString
	if err := db.QueryRowContext(ctx, q).Scan(&v); err != nil {
		return "", fmt.Errorf("faultlab: %q: %w", q, err)
	}
	return v.String, nil
}
