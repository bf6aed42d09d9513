package resilientpg

import (
	"net"
	"strconv"
	"strings"
	"time"
)

// The TCP settings of every connection the wrapper dials. Go's dialer,
// which pgx and go-sql-driver/mysql use, probes an idle connection after
// 15 s, every 15 s, 9 times: a dead path (a NAT or load balancer that
// dropped the flow, a host that vanished) is found after 2.5 minutes, and
// a statement sent into one waits for TCP's retransmissions, about 15
// minutes on Linux, unless the caller's context ends it. The wrapper's
// defaults find a dead idle path in about 30 s, with no round trip on the
// request's path (the checkout's socket peek sees the kernel's ETIMEDOUT),
// keep the flow alive through middleboxes that forget idle flows after a
// minute or more, and end a statement stuck on a dead path about 30 s
// after its last acknowledged byte. A long query on a live path is not
// affected: the server's kernel acknowledges the request and the
// keepalive probes while the query runs, and only unacknowledged data
// counts towards the user timeout.
var defaultKeepalive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}

// dialer is the dialer of the wrapper's own connections.
func dialer(o *Options) *net.Dialer {
	d := &net.Dialer{KeepAliveConfig: o.Keepalive}
	if !o.Keepalive.Enable {
		d.KeepAlive = -1 // off; a zero KeepAlive would mean Go's default
	}
	if o.TCPUserTimeout > 0 {
		d.Control = userTimeoutControl(o.TCPUserTimeout)
	}
	return d
}

// parseKeepalive reads resilient_keepalive: "off", or idle, interval and
// count separated by commas ("15s,5s,3").
func parseKeepalive(v string) (net.KeepAliveConfig, error) {
	if v == "off" {
		return net.KeepAliveConfig{}, nil
	}
	parts := strings.Split(v, ",")
	if len(parts) != 3 {
		return net.KeepAliveConfig{}, errBadValue
	}
	idle, err1 := time.ParseDuration(parts[0])
	interval, err2 := time.ParseDuration(parts[1])
	count, err3 := strconv.Atoi(parts[2])
	if err1 != nil || err2 != nil || err3 != nil {
		return net.KeepAliveConfig{}, errBadValue
	}
	return net.KeepAliveConfig{Enable: true, Idle: idle, Interval: interval, Count: count}, nil
}

// keepaliveString is the DSN spelling of k.
func keepaliveString(k net.KeepAliveConfig) string {
	if !k.Enable {
		return "off"
	}
	return k.Idle.String() + "," + k.Interval.String() + "," + strconv.Itoa(k.Count)
}
