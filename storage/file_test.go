package storage

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// newTestFile returns a File over a new file of size bytes of 0xaa.
func newTestFile(t *testing.T, size int, opts OpenOptions) (*File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0xaa}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := OpenWith(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, path
}

// The operations of a File reach the file, with pread/pwrite and through a
// mapping alike.
func TestFileOperations(t *testing.T) {
	for name, opts := range map[string]OpenOptions{"pread": {}, "mmap": {Mmap: true}} {
		t.Run(name, func(t *testing.T) {
			f, path := newTestFile(t, 1<<20, opts)
			w := make([]byte, 8192)
			for i := range w {
				w[i] = byte(i)
			}
			if _, err := f.WriteAtFUA(w, 8192); err != nil {
				t.Fatalf("FUA write: %v", err)
			}
			r := make([]byte, 8192)
			if _, err := f.ReadAt(r, 8192); err != nil || !bytes.Equal(r, w) {
				t.Fatalf("read back: %v", err)
			}
			// Just written, the data is in the page cache: a no-wait read
			// gets it (through a mapping it is a copy).
			if _, err := f.ReadAtNoWait(r, 8192); err != nil || !bytes.Equal(r, w) {
				t.Fatalf("no-wait read of cached data: %v", err)
			}
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := f.Discard(0, 4096); err != nil {
				t.Fatal(err)
			}
			if err := f.WriteZeroes(16384, 4096); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data[:4096], make([]byte, 4096)) || !bytes.Equal(data[16384:20480], make([]byte, 4096)) {
				t.Fatal("discarded/zeroed ranges are not zero")
			}
			if !bytes.Equal(data[8192:16384], w) || data[4096] != 0xaa || data[20480] != 0xaa {
				t.Fatal("data outside the zeroed ranges changed")
			}
		})
	}
}

// A read past the mapping, or of a mapped file truncated behind our back,
// fails with EIO instead of crashing.
func TestFileMmapFaults(t *testing.T) {
	f, path := newTestFile(t, 64<<10, OpenOptions{Mmap: true})
	if _, err := f.ReadAt(make([]byte, 8192), 60<<10); !errors.Is(err, unix.EIO) {
		t.Fatalf("read past the mapping: %v, want EIO", err)
	}
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(make([]byte, 4096), 32<<10); !errors.Is(err, unix.EIO) {
		t.Fatalf("read of a truncated mapping: %v, want EIO", err)
	}
	if err := f.Grow(1 << 20); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Grow of a mapped file: %v, want EINVAL", err)
	}
}

func TestOpenRejectsOtherFiles(t *testing.T) {
	if _, err := Open(t.TempDir()); err == nil {
		t.Fatal("a directory was accepted as a backing device")
	}
	path := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(path, nil, 0o600)
	if _, err := OpenWith(path, OpenOptions{Mmap: true}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("mmap of an empty file: %v, want EINVAL", err)
	}
}
