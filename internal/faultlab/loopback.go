package faultlab

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// loopbackHost is the only address this package listens on or connects to:
// fault tests must never send traffic off the machine.
const loopbackHost = "127.0.0.1"

// freePort asks the kernel for an unused port on 127.0.0.1. The port is
// released before it is returned, so another process could take it in the
// meantime; callers that start servers retry with a new port when the
// server reports the address as in use.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(loopbackHost, "0"))
	if err != nil {
		return 0, fmt.Errorf("faultlab: find free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// loopbackAddr returns "127.0.0.1:port".
func loopbackAddr(port int) string {
	return net.JoinHostPort(loopbackHost, strconv.Itoa(port))
}

// checkLoopback rejects any address that is not an IPv4 loopback literal
// with a port. Host names are refused too, because resolving them could
// lead somewhere other than this machine.
func checkLoopback(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("faultlab: address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if ip == nil || ip.To4() == nil || !ip.IsLoopback() {
		return fmt.Errorf("faultlab: address %q is not a 127.0.0.0/8 address; only loopback targets are allowed", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return fmt.Errorf("faultlab: address %q has no valid port", addr)
	}
	return nil
}

// isPortInUse reports whether a server log says its port was taken, the
// one start failure worth retrying with another port (see freePort).
func isPortInUse(log string) bool {
	return strings.Contains(log, "Address already in use") || strings.Contains(log, "Do you already have another")
}
