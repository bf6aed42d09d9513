package resilientpg

import (
	"context"
	"database/sql"
	"reflect"
	"testing"
)

// columnInfo is what database/sql reports about a result's columns.
type columnInfo struct {
	Scan             reflect.Type
	DBType           string
	Length           int64
	HasLength        bool
	Nullable, HasNul bool
	Prec, Scale      int64
	HasDecimal       bool
}

func describe(t *testing.T, db *sql.DB) ([]columnInfo, bool) {
	t.Helper()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, "SELECT v")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	cts, err := rows.ColumnTypes()
	if err != nil {
		t.Fatal(err)
	}
	var out []columnInfo
	for _, ct := range cts {
		var ci columnInfo
		ci.Scan, ci.DBType = ct.ScanType(), ct.DatabaseTypeName()
		ci.Length, ci.HasLength = ct.Length()
		ci.Nullable, ci.HasNul = ct.Nullable()
		ci.Prec, ci.Scale, ci.HasDecimal = ct.DecimalSize()
		out = append(out, ci)
	}
	for rows.Next() {
	}
	return out, rows.NextResultSet()
}

// TestTxRowsParity: rows wrapped inside a transaction look to database/sql
// exactly as the inner rows do, for rows without the optional interfaces.
func TestTxRowsParity(t *testing.T) {
	f := &fakeConnector{shape: shapePgx}
	bare := sql.OpenDB(f)
	defer bare.Close()
	c, err := NewConnector(&fakeConnector{shape: shapePgx}, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	wrapped := sql.OpenDB(c)
	defer wrapped.Close()
	want, wantNext := describe(t, bare)
	got, gotNext := describe(t, wrapped)
	if !reflect.DeepEqual(got, want) || gotNext != wantNext {
		t.Errorf("through the wrapper: %+v, next result set %v; bare: %+v, %v", got, gotNext, want, wantNext)
	}
}
