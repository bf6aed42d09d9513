// Package examples proves resilientpg under the libraries Go programs stack
// on *sql.DB (sqlx, gorm, bun, ent, otelsql, goose, golang-migrate and
// sqlc-style code). It holds only tests; README-snippets.md has the usage.
package examples
