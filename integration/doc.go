// Package integration holds the resilientpg tests and benchmarks against
// real PostgreSQL and MariaDB servers. By default each test binary starts
// throwaway servers from the installed binaries (internal/faultlab) on free
// loopback ports and removes them at the end; RESILIENTPG_TEST_POSTGRES_DSN
// and RESILIENTPG_TEST_MYSQL_DSN name existing servers instead (the tests
// kill only their own sessions there).
//
// With CI set, a server that cannot be started or reached fails the tests;
// elsewhere, missing server binaries skip them.
package integration
