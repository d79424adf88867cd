// containerd's snapshotter conformance suite (snapshots/testsuite, containerd 1.6) against
// `lazysnap serve`, through containerd's own proxy client — what containerd uses for a
// `[proxy_plugins]` snapshotter — plus a rename check of our own (the 1.6 suite skips its
// Rename test).
//
// Run (GOPATH mode, offline, against Debian's golang-github-containerd-containerd-dev), as root:
//
//	cd tests/conformance && LAZYSNAP_BIN=/path/to/lazysnap \
//	  GO111MODULE=off GOPATH=$(mktemp -d):/usr/share/gocode go test -v -count=1 .
//
// Each test starts a fresh `lazysnap serve --root <root> --address <root>/sock`; its log goes to
// $LAZYSNAP_CONFORMANCE_LOGS (or a temporary directory printed at the start).
package conformance

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
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/containerd/continuity/fs/fstest"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
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
		d, err := os.MkdirTemp("", "lazysnap-conformance-logs-")
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
	fmt.Fprintf(os.Stderr, "lazysnap serve logs: %s\n", logDir)
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

// dial connects the way containerd 1.6 dials a proxy plugin (services/server's
// proxyClients.getClient): target "unix://<path>", containerd's dialer.
func dial(ctx context.Context, sock string) (*grpc.ClientConn, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return grpc.DialContext(dctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(dialer.ContextDialer),
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
	conn, err := dial(ctx, srv.sock)
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

func TestSnapshotterSuite(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "lazysnap", newSnapshotter)
}

// TestRename: renames in an active snapshot on top of lower layers — a non-empty directory
// from a lower layer, files over each other (upper over lower, lower over lower), a file out
// of the renamed directory — checked in the active mount itself, then after commit in a view
// and in a child snapshot.
func TestRename(t *testing.T) {
	requireRoot(t)
	// The FUSE upper's own rename (overlay mode renames through the kernel's redirects: see
	// tests/conformance2, containerd 2.x's suite, and tests/overlay.rs).
	if old, had := os.LookupEnv("LAZYSNAP_UPPER"); had {
		defer os.Setenv("LAZYSNAP_UPPER", old)
	} else {
		defer os.Unsetenv("LAZYSNAP_UPPER")
	}
	os.Setenv("LAZYSNAP_UPPER", "fuse")
	ctx := namespaces.WithNamespace(context.Background(), "conformance")
	tmp, err := os.MkdirTemp("", "lazysnap-rename-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	work := filepath.Join(tmp, "work")
	for _, d := range []string{root, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sn, closeFn, err := newSnapshotter(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := closeFn(); err != nil {
			t.Errorf("close: %v", err)
		}
	}()

	l1 := fstest.Apply(
		fstest.CreateDir("/dir1", 0o700),
		fstest.CreateDir("/dir1/sub", 0o755),
		fstest.CreateFile("/dir1/sub/deep", []byte("deep in a lower directory"), 0o644),
		fstest.CreateFile("/dir1/f", []byte("in dir1"), 0o600),
		fstest.Symlink("sub/deep", "/dir1/link"),
		fstest.CreateDir("/somefiles", 0o700),
		fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0o644),
		fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0o644),
		fstest.CreateFile("/somefiles/a", []byte("lower a"), 0o644),
		fstest.CreateFile("/somefiles/b", []byte("lower b"), 0o640),
	)
	l2 := fstest.Apply(
		fstest.Rename("/dir1", "/dir2"),
		fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0o644),
		fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
		fstest.Rename("/somefiles/f2", "/somefiles/f3"),
		fstest.Rename("/somefiles/a", "/somefiles/b"),
		fstest.Rename("/dir2/f", "/f-from-dir2"),
		fstest.CreateFile("/dir2/new", []byte("new in the renamed dir"), 0o644),
	)
	l3 := fstest.Apply(
		fstest.Rename("/dir2", "/dir1"),
		fstest.Rename("/somefiles/b", "/somefiles/f3"),
	)

	flat := filepath.Join(work, "flat")
	if err := os.MkdirAll(flat, 0o755); err != nil {
		t.Fatal(err)
	}
	parent := ""
	for i, a := range []fstest.Applier{l1, l2, l3} {
		key := fmt.Sprintf("rename-%d-active", i)
		name := fmt.Sprintf("rename-%d", i)
		mnt := filepath.Join(work, key)
		if err := os.MkdirAll(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		mounts, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatalf("layer %d: prepare: %v", i, err)
		}
		if err := mount.All(mounts, mnt); err != nil {
			t.Fatalf("layer %d: mount: %v", i, err)
		}
		if err := a.Apply(flat); err != nil {
			unix.Unmount(mnt, 0)
			t.Fatalf("layer %d: applying to the flat dir: %v", i, err)
		}
		if err := a.Apply(mnt); err != nil {
			unix.Unmount(mnt, 0)
			t.Fatalf("layer %d: applying to the active snapshot: %v", i, err)
		}
		if err := fstest.CheckDirectoryEqual(flat, mnt); err != nil {
			unix.Unmount(mnt, 0)
			t.Fatalf("layer %d: active snapshot differs from the flat dir: %v", i, err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatalf("layer %d: unmount: %v", i, err)
		}
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatalf("layer %d: commit: %v", i, err)
		}
		// containerd's contract: commit removes the active snapshot.
		if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
			t.Fatalf("layer %d: active %s after commit: want NotFound, got %v", i, key, err)
		}
		// A view of the committed snapshot must equal the flat dir.
		view := filepath.Join(work, name+"-view")
		if err := os.MkdirAll(view, 0o755); err != nil {
			t.Fatal(err)
		}
		vm, err := sn.View(ctx, view, name)
		if err != nil {
			t.Fatalf("layer %d: view: %v", i, err)
		}
		if err := mount.All(vm, view); err != nil {
			t.Fatalf("layer %d: mount view: %v", i, err)
		}
		err = fstest.CheckDirectoryEqual(flat, view)
		if uerr := unix.Unmount(view, 0); uerr != nil {
			t.Fatalf("layer %d: unmount view: %v", i, uerr)
		}
		if err != nil {
			t.Fatalf("layer %d: view of the committed snapshot differs from the flat dir: %v", i, err)
		}
		if err := sn.Remove(ctx, view); err != nil {
			t.Fatalf("layer %d: remove view: %v", i, err)
		}
		parent = name
	}
}
