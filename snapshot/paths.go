package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/internal/caller"
)

// userPath is a path as the user named it and as the daemon opens it.
type userPath struct {
	name string // as given, for messages and reports
	open string // the same file in the daemon's view
}

// locate checks that p is absolute, finds it in the caller's view and
// tells where it lives. Unless mayBeNew, the file must exist (ENOENT).
func locate(ctx context.Context, what, p string, mayBeNew bool) (userPath, identity, error) {
	if p == "" {
		return userPath{}, identity{}, fmt.Errorf("%w: no %s given", ErrInvalid, what)
	}
	if !filepath.IsAbs(p) {
		return userPath{}, identity{}, fmt.Errorf("%w: %s %q is not an absolute path", ErrInvalid, what, p)
	}
	p = filepath.Clean(p)
	up := userPath{name: p, open: caller.Of(ctx).Root + p}
	id, err := identify(up.open)
	if err != nil {
		return userPath{}, identity{}, fmt.Errorf("%s %s: %w", what, p, err)
	}
	if !id.exists && !mayBeNew {
		return userPath{}, identity{}, fmt.Errorf("%s %s: no such file or device: %w", what, p, syscall.ENOENT)
	}
	return up, id, nil
}

// identity tells where a path lives, to keep the difference storage and
// backing files off the devices the manager serves.
type identity struct {
	fsDev  uint64 // st_dev: the device holding the file (or its directory)
	rdev   uint64 // st_rdev of a block device, else 0
	ino    uint64 // st_ino, 0 for a path that does not exist yet
	exists bool
}

// identify stats p, or its directory when p does not exist yet.
func identify(p string) (identity, error) {
	var st unix.Stat_t
	err := unix.Stat(p, &st)
	if errors.Is(err, unix.ENOENT) {
		if err := unix.Stat(filepath.Dir(p), &st); err != nil {
			return identity{}, fmt.Errorf("stat %s: %w", filepath.Dir(p), err)
		}
		return identity{fsDev: st.Dev}, nil
	}
	if err != nil {
		return identity{}, fmt.Errorf("stat %s: %w", p, err)
	}
	id := identity{fsDev: st.Dev, ino: st.Ino, exists: true}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		id.rdev = st.Rdev
	}
	return id, nil
}

// on reports whether the path is device dev itself or a file on a
// filesystem of dev.
func (id identity) on(dev uint64) bool {
	return id.rdev == dev || (id.rdev == 0 && id.fsDev == dev)
}

// sameFile reports whether two identities name the same existing file or
// device.
func (id identity) sameFile(o identity) bool {
	if id.rdev != 0 || o.rdev != 0 {
		return id.rdev == o.rdev
	}
	return id.exists && o.exists && id.fsDev == o.fsDev && id.ino == o.ino
}

// createdFile is a storage file the manager created, removed when its
// snapshot is destroyed. The directory is held open, so the file is
// removed from the place it was created whatever the namespaces do.
type createdFile struct {
	dir  *os.File // O_PATH descriptor of the directory
	name string   // base name in dir
}

// createFile creates p exclusively, empty, and remembers where.
func createFile(p string) (*createdFile, error) {
	dir, err := os.OpenFile(filepath.Dir(p), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	name := filepath.Base(p)
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		dir.Close()
		return nil, fmt.Errorf("create %s: %w", p, err)
	}
	unix.Close(fd)
	return &createdFile{dir: dir, name: name}, nil
}

// remove unlinks the file and closes the directory.
func (c *createdFile) remove() error {
	err := unix.Unlinkat(int(c.dir.Fd()), c.name, 0)
	c.dir.Close()
	if err != nil {
		return fmt.Errorf("remove difference storage file %s: %w", c.name, err)
	}
	return nil
}
