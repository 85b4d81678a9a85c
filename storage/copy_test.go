package storage

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// CopyRange copies between two files inside the kernel: buffered or from
// a source read with O_DIRECT (whose page cache stays empty), into a
// destination that grows as needed; a device that is no regular file, or
// a mapped one, is refused with ErrNoKernelCopy and nothing is written.
func TestCopyRange(t *testing.T) {
	for name, opts := range map[string]OpenOptions{"buffered": {}, "direct": {Direct: true}} {
		t.Run(name, func(t *testing.T) {
			src, srcPath := newTestFile(t, 1<<20, opts)
			if opts.Direct && !src.DirectIO() {
				t.Skipf("no direct I/O in the test directory: %v", src.DirectIOError())
			}
			data := make([]byte, 256<<10)
			for i := range data {
				data[i] = byte(i * 7)
			}
			if _, err := src.WriteAt(data, 512<<10); err != nil {
				t.Fatal(err)
			}
			if opts.Direct {
				if err := unix.Fadvise(src.CachedFD(), 0, 0, unix.FADV_DONTNEED); err != nil {
					t.Fatal(err)
				}
			}
			dst, _ := newTestFile(t, 64<<10, OpenOptions{})
			// Past the end of the destination, as a region of a storage
			// file whose growth has not run yet.
			if err := CopyRange(dst, 128<<10, src, 512<<10, int64(len(data))); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if _, err := dst.ReadAt(got, 128<<10); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("copied data differs (read: %v)", err)
			}
			if n := residentPages(t, srcPath); opts.Direct && n != 0 {
				t.Errorf("%d pages of the direct source in the page cache after the copy", n)
			}
		})
	}
	f, _ := newTestFile(t, 1<<20, OpenOptions{})
	mapped, _ := newTestFile(t, 1<<20, OpenOptions{Mmap: true})
	mem := NewMemDevice("mem", Geometry{Size: 1 << 20, LogicalBlockSize: SectorSize})
	for name, pair := range map[string][2]Device{"from memory": {f, mem}, "to memory": {mem, f}, "mapped": {mapped, f}} {
		if err := CopyRange(pair[0], 0, pair[1], 0, 4096); !errors.Is(err, ErrNoKernelCopy) {
			t.Errorf("%s: %v, want ErrNoKernelCopy", name, err)
		}
	}
}
