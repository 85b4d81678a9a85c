package storage

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// residentPages counts the pages of path in the page cache (mincore over a
// mapping of it, which reads nothing).
func residentPages(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// With OpenOptions.Direct on a file system that has direct I/O, the data
// goes past the page cache: aligned and unaligned reads and writes and FUA
// writes all reach the file, a no-wait read always says it would block,
// and the file's pages stay out of the cache (but for what an unaligned
// write put there).
func TestFileDirect(t *testing.T) {
	const size = 1 << 20
	f, path := newTestFile(t, size, OpenOptions{Direct: true})
	if !f.DirectIO() {
		t.Skipf("the file system of the test directory has no direct I/O: %v", f.DirectIOError())
	}
	if f.DataFD() == f.CachedFD() {
		t.Fatal("DataFD is the cached descriptor under direct I/O")
	}
	// What the buffered write of newTestFile left in the cache.
	if err := unix.Fadvise(f.CachedFD(), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	w := alignedBuffer(64<<10, 4095)
	for i := range w {
		w[i] = byte(i * 7)
	}
	if _, err := f.WriteAt(w, 128<<10); err != nil {
		t.Fatalf("aligned write: %v", err)
	}
	if _, err := f.WriteAtFUA(w[:8192], 512<<10); err != nil {
		t.Fatalf("aligned FUA write: %v", err)
	}
	r := alignedBuffer(64<<10, 4095)
	if _, err := f.ReadAt(r, 128<<10); err != nil || !bytes.Equal(r, w) {
		t.Fatalf("aligned read back: %v", err)
	}
	// Unaligned in memory, offset and length: through a bounce buffer.
	odd := make([]byte, 1001)
	if _, err := f.ReadAt(odd, 128<<10+3); err != nil || !bytes.Equal(odd, w[3:1004]) {
		t.Fatalf("unaligned read: %v", err)
	}
	if n := residentPages(t, path); n != 0 {
		t.Errorf("%d pages of the file in the page cache after direct I/O, want 0", n)
	}
	if _, err := f.ReadAtNoWait(r, 128<<10); !errors.Is(err, ErrWouldBlock) {
		t.Errorf("no-wait read under direct I/O: %v, want ErrWouldBlock", err)
	}
	if _, err := f.WriteAt([]byte("unaligned"), 600<<10+5); err != nil {
		t.Fatalf("unaligned write: %v", err)
	}
	// Past the end: what there is, then io.EOF.
	tail := make([]byte, 100)
	if n, err := f.ReadAt(tail, size-10); n != 10 || err == nil {
		t.Errorf("read across the end: %d bytes, %v; want 10 and an error", n, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case !bytes.Equal(data[128<<10:192<<10], w):
		t.Error("the aligned write is not in the file")
	case !bytes.Equal(data[512<<10:520<<10], w[:8192]):
		t.Error("the FUA write is not in the file")
	case string(data[600<<10+5:600<<10+14]) != "unaligned":
		t.Error("the unaligned write is not in the file")
	case data[0] != 0xaa || data[size-1] != 0xaa:
		t.Error("bytes nobody wrote changed")
	}
}

// A file in memory keeps the page cache, which is its storage, and says
// why.
func TestFileDirectInMemory(t *testing.T) {
	dir, err := os.MkdirTemp("/dev/shm", "storage-test")
	if err != nil {
		t.Skipf("no tmpfs at /dev/shm: %v", err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "backing")
	if err := os.WriteFile(path, make([]byte, 1<<16), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := OpenWith(path, OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.DirectIO() || f.DirectIOError() == nil || f.DataFD() != f.CachedFD() {
		t.Fatalf("tmpfs file: DirectIO %v (%v), want false with a reason", f.DirectIO(), f.DirectIOError())
	}
	if _, err := OpenWith(path, OpenOptions{Direct: true, Mmap: true}); err == nil {
		t.Error("Direct with Mmap opened")
	}
}
