// containerd 2.x's snapshotter conformance suite (core/snapshots/testsuite, the version pinned
// in go.mod, the same as scripts/install-containerd2.sh builds) against `lazysnap serve`,
// through containerd 2.x's own proxy client (core/snapshots/proxy) — what containerd 2.x uses
// for a `[proxy_plugins]` snapshotter — dialled as containerd 2.x dials a proxy plugin.
// Every test of the suite runs, Rename included (2.x renames a lower directory for every
// snapshotter but overlayfs, fuse-overlayfs and erofs); the suite's own mount manager is in
// the path (2.x's testsuite activates mounts through core/mount/manager before mounting).
//
// Run (module mode; Go >= the go line below, modules from the Go module proxy), as root:
//
//	cd tests/conformance2 && LAZYSNAP_BIN=/path/to/lazysnap LAZYSNAP_UPPER=overlay|fuse \
//	  go test -v -count=1 .
//
// Each test starts a fresh `lazysnap serve --root <root> --address <root>/sock`; its log goes to
// $LAZYSNAP_CONFORMANCE_LOGS (or a temporary directory printed at the start).
package conformance2

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
)

var (
	logDir  string
	serveNo int64
)

func TestMain(m *testing.M) {
	if os.Getenv("LAZYSNAP_BIN") == "" {
		fmt.Fprintln(os.Stderr, "LAZYSNAP_BIN must name the lazysnap binary")
		os.Exit(2)
	}
	logDir = os.Getenv("LAZYSNAP_CONFORMANCE_LOGS")
	if logDir == "" {
		d, err := os.MkdirTemp("", "lazysnap-conformance2-logs-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		logDir = d
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Fprintf(os.Stderr, "lazysnap serve logs: %s (LAZYSNAP_UPPER=%q)\n", logDir, os.Getenv("LAZYSNAP_UPPER"))
	os.Exit(m.Run())
}

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the suite mounts the snapshots' mounts itself: it needs root")
	}
}

// server is one running `lazysnap serve`.
type server struct {
	cmd  *exec.Cmd
	done chan error
	root string
	sock string
	log  string
}

func startServer(root string) (*server, error) {
	bin := os.Getenv("LAZYSNAP_BIN")
	sock := filepath.Join(root, "sock")
	n := atomic.AddInt64(&serveNo, 1)
	logPath := filepath.Join(logDir, fmt.Sprintf("serve-%03d-%s.log", n, filepath.Base(filepath.Dir(root))))
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logf, "root %s\n", root)
	cmd := exec.Command(bin, "--root", root, "serve", "--address", sock, "--threads", "2", "--cache-size", "32M")
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), "LAZYSNAP_LOG="+envOr("LAZYSNAP_LOG", "info"))
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	s := &server{cmd: cmd, done: make(chan error, 1), root: root, sock: sock, log: logPath}
	go func() {
		s.done <- cmd.Wait()
		logf.Close()
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case err := <-s.done:
			return nil, fmt.Errorf("lazysnap serve exited before listening (%v); log: %s", err, logPath)
		default:
		}
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return s, nil
		}
		if time.Now().After(deadline) {
			s.kill()
			return nil, fmt.Errorf("lazysnap serve did not listen on %s in 20s; log: %s", sock, logPath)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func (s *server) kill() {
	_ = s.cmd.Process.Kill()
	<-s.done
}

// stop sends SIGTERM and waits; a server that does not exit cleanly in time is an error.
func (s *server) stop() error {
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("signalling lazysnap serve: %w", err)
	}
	select {
	case err := <-s.done:
		if err != nil {
			return fmt.Errorf("lazysnap serve exited with %v on SIGTERM; log: %s", err, s.log)
		}
		return nil
	case <-time.After(60 * time.Second):
		s.kill()
		return fmt.Errorf("lazysnap serve did not exit within 60s of SIGTERM; log: %s", s.log)
	}
}

// dial connects the way containerd 2.x dials a proxy plugin (cmd/containerd/server's
// proxyClients.getClient): grpc.NewClient on "unix://<path>", containerd's dialer, its backoff
// and message-size limits. NewClient connects lazily; the first RPC waits for the connection.
func dial(sock string) (*grpc.ClientConn, error) {
	bc := backoff.DefaultConfig
	bc.MaxDelay = 3 * time.Second
	return grpc.NewClient(dialer.DialAddress(sock),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bc}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
}

// unmountUnder detaches every mount at or below dir (deepest first).
func unmountUnder(dir string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescape(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	var first error
	for i := len(mps) - 1; i >= 0; i-- {
		if err := unix.Unmount(mps[i], unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT && first == nil {
			first = fmt.Errorf("unmounting %s: %w", mps[i], err)
		}
	}
	return first
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// newSnapshotter is the suite's factory: a fresh server on root, containerd's proxy client
// on its socket, and a close func that stops the server and cleans up leftover mounts.
func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	srv, err := startServer(root)
	if err != nil {
		return nil, nil, err
	}
	conn, err := dial(srv.sock)
	if err != nil {
		srv.kill()
		return nil, nil, fmt.Errorf("connecting to %s: %w", srv.sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazysnap")
	closeFn := func() error {
		errs := []error{sn.Close(), conn.Close(), srv.stop()}
		if err := unmountUnder(root); err != nil {
			errs = append(errs, err)
		}
		for _, e := range errs {
			if e != nil {
				return e
			}
		}
		return nil
	}
	return sn, closeFn, nil
}

// TestSnapshotterSuite runs every test of containerd 2.x's suite; the name "lazysnap" is not
// one the suite special-cases, so Rename renames a directory of a lower layer.
func TestSnapshotterSuite(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "lazysnap", newSnapshotter)
}
