package storage

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// dirtyPages returns how many pages of [off, off+n) of the file open as
// fd are dirty in the page cache (cachestat, Linux 6.5+). It skips the test
// where the kernel has no cachestat or the file lives in memory (tmpfs
// pages are never written back, so "durable" means nothing there).
func dirtyPages(t *testing.T, fd int, off, n int64) uint64 {
	t.Helper()
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC {
		t.Skip("the file is on a memory file system")
	}
	var cs unix.Cachestat_t
	err := unix.Cachestat(uint(fd), &unix.CachestatRange{Off: uint64(off), Len: uint64(n)}, &cs, 0)
	if errors.Is(err, unix.ENOSYS) {
		t.Skip("no cachestat on this kernel")
	}
	if err != nil {
		t.Fatalf("cachestat: %v", err)
	}
	return cs.Dirty
}

// A FUA write makes only itself durable: a plain write before it, 4 MiB
// away (beyond any large folio holding the FUA write's pages), is still
// dirty in the page cache afterwards; a whole-file fdatasync, the old FUA,
// would have written it back too. With pwrite (RWF_DSYNC) and through a
// mapping (msync of the range).
func TestFileFUAWritesOnlyItself(t *testing.T) {
	for name, opts := range map[string]OpenOptions{"pwrite": {}, "mmap": {Mmap: true}} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "backing")
			if err := os.WriteFile(path, make([]byte, 8<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := OpenWith(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			plain, fua := bytes.Repeat([]byte{1}, 4096), bytes.Repeat([]byte{2}, 8192)
			if _, err := f.WriteAt(plain, 0); err != nil {
				t.Fatal(err)
			}
			if dirtyPages(t, f.fd, 0, 4096) != 1 {
				t.Skip("the plain write was written back at once; nothing to compare")
			}
			if _, err := f.WriteAtFUA(fua, 4<<20); err != nil {
				t.Fatal(err)
			}
			if n := dirtyPages(t, f.fd, 4<<20, 8192); n != 0 {
				t.Errorf("%d pages of the FUA write are still dirty after it returned", n)
			}
			if n := dirtyPages(t, f.fd, 0, 4096); n != 1 {
				t.Errorf("the FUA write also wrote back the plain write before it (%d dirty pages left, want 1)", n)
			}
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			if n := dirtyPages(t, f.fd, 0, 8<<20); n != 0 {
				t.Errorf("%d dirty pages after a flush", n)
			}
		})
	}
}
