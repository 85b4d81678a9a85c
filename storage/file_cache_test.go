package storage

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// diskFile returns a File over a new file of size bytes of 0xaa in a
// directory whose file system keeps data on a disk (not tmpfs, where the
// page cache is the data and cannot be dropped); the test is skipped if
// there is none.
func diskFile(t *testing.T, size int) (*File, string) {
	t.Helper()
	dir := t.TempDir()
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC {
		t.Skipf("%s is on a memory file system", dir)
	}
	path := filepath.Join(dir, "backing")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0xaa}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, path
}

// dropCache writes back and evicts the file's pages from the page cache.
func dropCache(t *testing.T, f *File) {
	t.Helper()
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(f.fd, 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// A no-wait read of data not in the page cache answers ErrWouldBlock
// (EAGAIN), and serves the data once it is cached. RWF_NOWAIT starts the
// readahead of what is missing, though, and on a fast disk that can end
// before the read looks again: then the first read has the data too.
func TestFileReadNoWaitUncached(t *testing.T) {
	f, _ := diskFile(t, 1<<20)
	dropCache(t, f)
	p := make([]byte, 64<<10)
	want := bytes.Repeat([]byte{0xaa}, len(p))
	switch n, err := f.ReadAtNoWait(p, 256<<10); {
	case err == nil && n == len(p) && bytes.Equal(p, want):
		t.Log("the readahead of the no-wait read finished before it looked again")
	case !errors.Is(err, ErrWouldBlock) || !errors.Is(err, syscall.EAGAIN):
		t.Fatalf("no-wait read of uncached data: %d bytes, %v; want ErrWouldBlock or all the data", n, err)
	}
	if _, err := f.ReadAt(p, 256<<10); err != nil {
		t.Fatal(err)
	}
	clear(p)
	if n, err := f.ReadAtNoWait(p, 256<<10); err != nil || n != len(p) || !bytes.Equal(p, want) {
		t.Fatalf("no-wait read of cached data: %d, %v", n, err)
	}
}

// allocated returns the bytes the file system has allocated to path.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// WriteZeroes zeroes a range keeping its allocation (NOUNMAP: a later
// write of it needs no new space); Discard gives the space back.
func TestFileZeroesKeepDiscardFrees(t *testing.T) {
	f, path := diskFile(t, 1<<20)
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, path)
	if err := f.WriteZeroes(0, 512<<10); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, path); got != before {
		t.Errorf("after write-zeroes %d bytes allocated, want %d (kept)", got, before)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[:512<<10], make([]byte, 512<<10)) || data[512<<10] != 0xaa {
		t.Fatal("write-zeroes did not zero exactly its range")
	}
	if err := f.Discard(0, 512<<10); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, path); got > before-512<<10 {
		t.Errorf("after discarding 512 KiB %d bytes allocated, want at most %d", got, before-512<<10)
	}
}

// The per-request calls allocate nothing.
func TestFileAllocations(t *testing.T) {
	f, _ := newTestFile(t, 1<<20, OpenOptions{})
	p := make([]byte, 4096)
	for name, call := range map[string]func() error{
		"read":         func() error { _, err := f.ReadAt(p, 4096); return err },
		"write":        func() error { _, err := f.WriteAt(p, 4096); return err },
		"no-wait read": func() error { _, err := f.ReadAtNoWait(p, 4096); return err },
		"FUA write":    func() error { _, err := f.WriteAtFUA(p, 4096); return err },
	} {
		if n := testing.AllocsPerRun(20, func() {
			if err := call(); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}); n != 0 {
			t.Errorf("%s: %v allocations per call, want 0", name, n)
		}
	}
}
