package faultlab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ErrNoNetns is wrapped by NewNetns when this machine or process cannot
// create network namespaces (not root, no ip or iptables, not Linux), so
// tests can say why they skip outside CI.
var ErrNoNetns = errors.New("faultlab: network namespaces unavailable")

// Netns is a network namespace of the test's own, joined to this one by a
// veth pair, where servers run so that faults can be injected in the
// kernel: iptables in the namespace drops or resets packets of real TCP
// flows, which a userspace proxy cannot do (its own kernel keeps ACKing,
// so keepalive and TCP_USER_TIMEOUT never fire through it).
//
// Addresses come from 198.18.0.0/15, the range reserved for network
// benchmark tests (RFC 2544), one /30 per namespace: HostIP is this
// namespace's end, ServerIP the other. Nothing routes beyond the pair.
// Close removes the namespace, its rules and both veth ends.
type Netns struct {
	// Name is the namespace's name under /run/netns.
	Name string
	// HostIP is the address of the veth end in this process's namespace,
	// the source address of every client connection.
	HostIP string
	// ServerIP is the address inside the namespace servers listen on.
	ServerIP string

	hostIf string
	logf   func(string, ...any)

	mu     sync.Mutex // serialises rule changes and Close
	closed bool
}

// netnsPrefix starts every namespace name this package creates; the stale
// sweep only looks at those. The creator's pid follows.
const netnsPrefix = "rpglab-"

// netnsSeq numbers the namespaces of this process, so that concurrent
// tests get distinct subnets and interface names.
var netnsSeq atomic.Int64

// netnsCmdTimeout bounds one ip or iptables command.
const netnsCmdTimeout = 10 * time.Second

// NewNetns creates a namespace with a veth pair and addresses on both
// ends. It needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), ip and iptables;
// without them the error wraps ErrNoNetns. On failure nothing is left
// behind. Call Close when done, after closing the servers inside.
func NewNetns(ctx context.Context, logf func(string, ...any)) (*Netns, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if err := netnsUsable(); err != nil {
		return nil, err
	}
	sweepNetns(logf)
	seq := netnsSeq.Add(1)
	tag := fmt.Sprintf("%x", (int64(os.Getpid())<<8|seq)&0xffffff)
	n := &Netns{
		Name:   fmt.Sprintf("%s%d-%d", netnsPrefix, os.Getpid(), seq),
		hostIf: "rpg" + tag + "h",
		logf:   logf,
	}
	var err error
	if n.HostIP, n.ServerIP, err = freeSubnet(ctx, seq); err != nil {
		return nil, err
	}
	peer := "rpg" + tag + "s"
	steps := [][]string{
		{"ip", "netns", "add", n.Name},
		{"ip", "link", "add", n.hostIf, "type", "veth", "peer", "name", peer},
		{"ip", "link", "set", peer, "netns", n.Name},
		{"ip", "addr", "add", n.HostIP + "/30", "dev", n.hostIf},
		{"ip", "link", "set", n.hostIf, "up"},
		{"ip", "netns", "exec", n.Name, "ip", "addr", "add", n.ServerIP + "/30", "dev", peer},
		{"ip", "netns", "exec", n.Name, "ip", "link", "set", peer, "up"},
		{"ip", "netns", "exec", n.Name, "ip", "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if _, err := runCmd(ctx, s...); err != nil {
			n.Close()
			return nil, err
		}
	}
	logf("faultlab: namespace %s: %s (here) <-> %s (inside)", n.Name, n.HostIP, n.ServerIP)
	return n, nil
}

// netnsUsable checks privilege and tools before anything is created.
func netnsUsable() error {
	if !netnsSupported {
		return fmt.Errorf("%w: only on Linux", ErrNoNetns)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: creating a network namespace needs root (running as uid %d)", ErrNoNetns, os.Geteuid())
	}
	for _, tool := range []string{"ip", "iptables", "ss"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%w: %s is not installed (bash .ci/setup installs it)", ErrNoNetns, tool)
		}
	}
	return nil
}

// freeSubnet picks a /30 in 198.18.0.0/15 that no interface uses yet,
// starting from one derived from the pid and seq, so that concurrent test
// processes rarely even try the same one.
func freeSubnet(ctx context.Context, seq int64) (host, server string, err error) {
	out, err := runCmd(ctx, "ip", "-4", "-o", "addr", "show")
	if err != nil {
		return "", "", err
	}
	const subnets = 1 << 15 // /30s in a /15
	base := netip.MustParseAddr("198.18.0.0").As4()
	start := (os.Getpid()*64 + int(seq)) % subnets
	for i := range subnets {
		k := uint32((start + i) % subnets)
		v := uint32(base[0])<<24 | uint32(base[1])<<16 | k<<2
		h := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v) + 1})
		s := h.Next()
		if !strings.Contains(out, " "+h.String()+"/") && !strings.Contains(out, " "+s.String()+"/") {
			return h.String(), s.String(), nil
		}
	}
	return "", "", errors.New("faultlab: no free /30 in 198.18.0.0/15")
}

// Close removes the namespace; the veth pair and every rule go with it.
// Servers inside must be closed first: a namespace with processes lives
// on (without its name) until they exit. Idempotent.
func (n *Netns) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	ctx, cancel := context.WithTimeout(context.Background(), netnsCmdTimeout)
	defer cancel()
	var errs []error
	// Deleting the host end first removes the pair at once; left to the
	// namespace's teardown it lingers for seconds (the kernel does that in
	// the background). It may be missing after a failure in NewNetns.
	if _, err := runCmd(ctx, "ip", "link", "del", n.hostIf); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
		errs = append(errs, err)
	}
	if _, err := runCmd(ctx, "ip", "netns", "del", n.Name); err != nil && !strings.Contains(err.Error(), "No such file") {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func linkExists(ctx context.Context, name string) bool {
	_, err := runCmd(ctx, "ip", "link", "show", "dev", name)
	return err == nil
}

// Flow is one established TCP connection to a server in the namespace,
// identified by the client's end (this namespace's address and port).
type Flow struct {
	Client netip.AddrPort
}

// Flows lists the established connections to ServerIP:port, as the
// namespace's kernel sees them.
func (n *Netns) Flows(ctx context.Context, port int) ([]Flow, error) {
	out, err := n.exec(ctx, "ss", "-Htn", "state", "established", fmt.Sprintf("( sport = :%d )", port))
	if err != nil {
		return nil, err
	}
	var flows []Flow
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		ap, err := netip.ParseAddrPort(f[len(f)-1])
		if err != nil {
			return nil, fmt.Errorf("faultlab: ss line %q: %w", line, err)
		}
		if ap.Addr().String() == n.HostIP {
			flows = append(flows, Flow{Client: ap})
		}
	}
	return flows, nil
}

// DropFlows silently drops every packet, both ways, of the connections
// established to port right now, as a NAT or load balancer does once it
// has forgotten a flow: they become truly half-open (no RST, no ACK, so
// keepalive and TCP_USER_TIMEOUT run out), while new connections pass.
// It returns how many flows it cut.
func (n *Netns) DropFlows(ctx context.Context, port int) (int, error) {
	return n.cutFlows(ctx, port, false)
}

// ResetFlows makes the next packet a client sends on each connection
// established to port right now be answered with a TCP RST, as an AWS NLB
// or NAT gateway does after its idle timeout. The server never hears of
// it. New connections pass. It returns how many flows it cut.
func (n *Netns) ResetFlows(ctx context.Context, port int) (int, error) {
	return n.cutFlows(ctx, port, true)
}

func (n *Netns) cutFlows(ctx context.Context, port int, reset bool) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	flows, err := n.Flows(ctx, port)
	if err != nil {
		return 0, err
	}
	// One iptables-restore call adds every rule at once: the flows are
	// cut together, as when a NAT table is lost, not one by one.
	var b strings.Builder
	b.WriteString("*filter\n")
	for _, f := range flows {
		cport := strconv.Itoa(int(f.Client.Port()))
		in := fmt.Sprintf("-A INPUT -p tcp -s %s --sport %s -d %s --dport %d", n.HostIP, cport, n.ServerIP, port)
		if reset {
			b.WriteString(in + " -j REJECT --reject-with tcp-reset\n")
			continue
		}
		b.WriteString(in + " -j DROP\n")
		fmt.Fprintf(&b, "-A OUTPUT -p tcp -s %s --sport %d -d %s --dport %s -j DROP\n", n.ServerIP, port, n.HostIP, cport)
	}
	b.WriteString("COMMIT\n")
	if err := n.restore(ctx, b.String(), false); err != nil {
		return 0, err
	}
	return len(flows), nil
}

// DropPort drops every packet to and from port, existing connections and
// new ones alike: the server is unreachable, and its clients cannot tell
// (no refusal, no reset) until Heal.
func (n *Netns) DropPort(ctx context.Context, port int) error {
	return n.rules(ctx,
		fmt.Sprintf("-A INPUT -p tcp -d %s --dport %d -j DROP", n.ServerIP, port),
		fmt.Sprintf("-A OUTPUT -p tcp -s %s --sport %d -j DROP", n.ServerIP, port))
}

// ResetPort answers every packet to port with a TCP RST until Heal:
// existing connections are reset at their next packet, new ones are
// refused.
func (n *Netns) ResetPort(ctx context.Context, port int) error {
	return n.rules(ctx, fmt.Sprintf("-A INPUT -p tcp -d %s --dport %d -j REJECT --reject-with tcp-reset", n.ServerIP, port))
}

// Heal removes every rule: dropped flows resume (their retransmissions now
// arrive), reset ones stay gone.
func (n *Netns) Heal(ctx context.Context) error {
	return n.rules(ctx) // a restore without rules flushes the table
}

// rules adds rule lines (iptables-save syntax) to the filter table.
func (n *Netns) rules(ctx context.Context, lines ...string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(lines) == 0 {
		return n.restore(ctx, "*filter\n:INPUT ACCEPT\n:OUTPUT ACCEPT\n:FORWARD ACCEPT\nCOMMIT\n", true)
	}
	return n.restore(ctx, "*filter\n"+strings.Join(lines, "\n")+"\nCOMMIT\n", false)
}

// restore feeds rules to iptables-restore in the namespace, adding to the
// existing ones unless flush. Caller holds n.mu.
func (n *Netns) restore(ctx context.Context, rules string, flush bool) error {
	if n.closed {
		return ErrClosed
	}
	args := []string{"ip", "netns", "exec", n.Name, "iptables-restore", "-w"}
	if !flush {
		args = append(args, "--noflush")
	}
	ctx, cancel := withDeadline(ctx, netnsCmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("faultlab: iptables-restore in %s: %w\n%s\nrules:\n%s", n.Name, err, out, rules)
	}
	return nil
}

// exec runs a command inside the namespace.
func (n *Netns) exec(ctx context.Context, args ...string) (string, error) {
	return runCmd(ctx, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// runCmd runs a command, bounded by netnsCmdTimeout, and returns its
// output; a failure carries the output.
func runCmd(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := withDeadline(ctx, netnsCmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("faultlab: %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// sweepNetnsOnce makes the stale sweep run once per process.
var sweepNetnsOnce sync.Once

// sweepNetns deletes namespaces an earlier, crashed run left behind: ours
// by name, and whose creating process is gone.
func sweepNetns(logf func(string, ...any)) {
	sweepNetnsOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), netnsCmdTimeout)
		defer cancel()
		out, err := runCmd(ctx, "ip", "netns", "list")
		if err != nil {
			return
		}
		for _, line := range strings.Split(out, "\n") {
			name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
			rest, ok := strings.CutPrefix(name, netnsPrefix)
			if !ok {
				continue
			}
			pidStr, _, _ := strings.Cut(rest, "-")
			pid, err := strconv.Atoi(pidStr)
			if err != nil || pid <= 0 || processAlive(pid) {
				continue
			}
			if _, err := runCmd(ctx, "ip", "netns", "del", name); err != nil {
				logf("faultlab: sweep namespace %s: %v", name, err)
			}
		}
	})
}
