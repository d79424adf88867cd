package conformance2

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/continuity/fs/fstest"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// TestRenameNonEmptyLower: the suite's Rename renames an empty lower directory only. Here, in
// the upper mode given by LAZYSNAP_UPPER, non-empty lower directories are renamed — within
// their parent and into a new directory, one inside another renamed one, files changed, linked
// and removed in them afterwards —, files renamed over each other; checked in the active mount,
// then after commit in a view and in the child snapshot built on it.
func TestRenameNonEmptyLower(t *testing.T) {
	requireRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "conformance")
	tmp, err := os.MkdirTemp("", "lazysnap-rename2-")
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
		fstest.CreateDir("/dir1/sub/deeper", 0o711),
		fstest.CreateFile("/dir1/sub/deeper/d2", []byte("deeper still"), 0o600),
		fstest.CreateFile("/dir1/f", []byte("in dir1"), 0o600),
		fstest.CreateFile("/dir1/h1", []byte("hardlinked"), 0o644),
		fstest.Link("/dir1/h1", "/dir1/h2"),
		fstest.Symlink("sub/deep", "/dir1/link"),
		fstest.CreateDir("/a", 0o755),
		fstest.CreateDir("/a/b", 0o750),
		fstest.CreateDir("/a/b/c", 0o755),
		fstest.CreateFile("/a/b/c/file", []byte("in a/b/c"), 0o644),
		fstest.CreateFile("/a/b/bfile", []byte("in a/b"), 0o644),
		fstest.CreateDir("/somefiles", 0o700),
		fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0o644),
		fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0o644),
		fstest.CreateFile("/somefiles/a", []byte("lower a"), 0o644),
		fstest.CreateFile("/somefiles/b", []byte("lower b"), 0o640),
	)
	l2 := fstest.Apply(
		fstest.Rename("/dir1", "/dir2"),
		fstest.CreateDir("/x", 0o755),
		fstest.Rename("/dir2/sub", "/x/sub2"),
		fstest.CreateFile("/x/sub2/deep", []byte("changed after the move"), 0o644),
		fstest.Remove("/x/sub2/deeper/d2"),
		fstest.Rename("/a/b", "/a/b2"),
		fstest.Rename("/a", "/a2"),
		fstest.CreateFile("/a2/b2/c/new", []byte("new under a twice-renamed dir"), 0o644),
		fstest.Remove("/a2/b2/bfile"),
		fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0o644),
		fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
		fstest.Rename("/somefiles/f2", "/somefiles/f3"),
		fstest.Rename("/somefiles/a", "/somefiles/b"),
		fstest.Rename("/dir2/f", "/f-from-dir2"),
		fstest.CreateFile("/dir2/new", []byte("new in the renamed dir"), 0o644),
	)
	l3 := fstest.Apply(
		fstest.Rename("/dir2", "/dir1"),
		fstest.Rename("/x/sub2", "/dir1/sub"),
		fstest.Rename("/somefiles/b", "/somefiles/f3"),
		fstest.Rename("/a2/b2/c", "/c-out"),
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
		if err := fstest.CheckDirectoryEqual(flat, mnt); err != nil {
			unix.Unmount(mnt, 0)
			t.Fatalf("layer %d: the new active snapshot differs from the flat dir: %v", i, err)
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
		if _, err := sn.Stat(ctx, key); !errdefs.IsNotFound(err) {
			t.Fatalf("layer %d: active %s after commit: want NotFound, got %v", i, key, err)
		}
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
