package examples

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
)

// What sqlc generates for database/sql (sql_package: database/sql), written
// by hand: the Queries type runs on anything with these four methods, so
// the same code works over the wrapper's *sql.DB, a *sql.Tx or a *sql.Conn.

type DBTX interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
	PrepareContext(context.Context, string) (*sql.Stmt, error)
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
	QueryRowContext(context.Context, string, ...any) *sql.Row
}

func New(db DBTX) *Queries { return &Queries{db: db} }

type Queries struct {
	db DBTX
	// countAuthorsStmt is set by Prepare (sqlc's emit_prepared_queries).
	countAuthorsStmt *sql.Stmt
}

func (q *Queries) WithTx(tx *sql.Tx) *Queries {
	wq := &Queries{db: tx}
	if q.countAuthorsStmt != nil {
		wq.countAuthorsStmt = tx.Stmt(q.countAuthorsStmt)
	}
	return wq
}

// Prepare prepares on the *sql.DB: database/sql re-prepares the statement on
// whichever connection runs it, so a killed session does not break it.
func Prepare(ctx context.Context, db DBTX) (*Queries, error) {
	q := New(db)
	var err error
	if q.countAuthorsStmt, err = db.PrepareContext(ctx, countAuthors); err != nil {
		return nil, fmt.Errorf("error preparing query CountAuthors: %w", err)
	}
	return q, nil
}

func (q *Queries) Close() error { return q.countAuthorsStmt.Close() }

type Author struct {
	ID   int64
	Name string
	Bio  sql.NullString
}

const createAuthor = `INSERT INTO ex_sqlc_authors (name, bio) VALUES ($1, $2) RETURNING id, name, bio`

func (q *Queries) CreateAuthor(ctx context.Context, name string, bio sql.NullString) (Author, error) {
	row := q.db.QueryRowContext(ctx, createAuthor, name, bio)
	var i Author
	err := row.Scan(&i.ID, &i.Name, &i.Bio)
	return i, err
}

const getAuthor = `SELECT id, name, bio FROM ex_sqlc_authors WHERE id = $1`

func (q *Queries) GetAuthor(ctx context.Context, id int64) (Author, error) {
	row := q.db.QueryRowContext(ctx, getAuthor, id)
	var i Author
	err := row.Scan(&i.ID, &i.Name, &i.Bio)
	return i, err
}

const listAuthors = `SELECT id, name, bio FROM ex_sqlc_authors ORDER BY id LIMIT 3`

func (q *Queries) ListAuthors(ctx context.Context) ([]Author, error) {
	rows, err := q.db.QueryContext(ctx, listAuthors)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var items []Author
	for rows.Next() {
		var i Author
		if err := rows.Scan(&i.ID, &i.Name, &i.Bio); err != nil {
			return nil, err
		}
		items = append(items, i)
	}
	return items, rows.Err()
}

const countAuthors = `SELECT count(*) FROM ex_sqlc_authors`

func (q *Queries) CountAuthors(ctx context.Context) (int64, error) {
	var n int64
	err := q.countAuthorsStmt.QueryRowContext(ctx).Scan(&n)
	return n, err
}

const deleteAuthor = `DELETE FROM ex_sqlc_authors WHERE id = $1`

func (q *Queries) DeleteAuthor(ctx context.Context, id int64) error {
	_, err := q.db.ExecContext(ctx, deleteAuthor, id)
	return err
}

// TestSqlcStyle runs sqlc-style code over the wrapper's *sql.DB and inside
// *sql.Tx: even operations create in a transaction and commit, odd ones
// work on the pool directly, including the prepared statement.
func TestSqlcStyle(t *testing.T) {
	t.Parallel()
	tg := pgTarget(t, "sqlc")
	db := tg.open(t)
	ctx := ctxT(t)
	for _, s := range []string{"DROP TABLE IF EXISTS ex_sqlc_authors",
		"CREATE TABLE ex_sqlc_authors (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, bio TEXT)"} {
		if _, err := db.ExecContext(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { db.Exec("DROP TABLE IF EXISTS ex_sqlc_authors") })
	q, err := Prepare(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	first, err := q.CreateAuthor(ctx, "Brian Kernighan", sql.NullString{String: "Co-author of The C Programming Language", Valid: true})
	if err != nil {
		t.Fatal(err)
	}

	proveAfterKill(t, tg, db, "sqlc-style", func(ctx context.Context, i int) error {
		if i%2 == 0 {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer tx.Rollback()
			qtx := q.WithTx(tx)
			a, err := qtx.CreateAuthor(ctx, fmt.Sprint("author", i), sql.NullString{})
			if err != nil {
				return err
			}
			if got, err := qtx.GetAuthor(ctx, a.ID); err != nil || got.Name != a.Name {
				return fmt.Errorf("GetAuthor in tx: %+v, %v", got, err)
			}
			if _, err := qtx.CountAuthors(ctx); err != nil {
				return err
			}
			return tx.Commit()
		}
		got, err := q.GetAuthor(ctx, first.ID)
		if err != nil || got.Name != first.Name {
			return fmt.Errorf("GetAuthor: %+v, %v", got, err)
		}
		if _, err := q.ListAuthors(ctx); err != nil {
			return err
		}
		a, err := q.CreateAuthor(ctx, fmt.Sprint("temp", i), sql.NullString{})
		if err != nil {
			return err
		}
		if n, err := q.CountAuthors(ctx); err != nil || n < 2 {
			return fmt.Errorf("CountAuthors = %d, %v", n, err)
		}
		return q.DeleteAuthor(ctx, a.ID)
	})
}
