package ublk

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func newTestBackend(t *testing.T, size int64, opts FileOptions) (*FileBackend, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0xaa}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := OpenFileBackend(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, path
}

func request(op Op, flags Flags, off int64, n int, noWait bool) *Request {
	r := &Request{Op: op, Flags: flags, Offset: off, Length: n, noWait: noWait}
	if op == OpRead || op == OpWrite {
		r.Buf = make([]byte, n)
	}
	return r
}

func TestFileBackend(t *testing.T) {
	for _, opts := range []FileOptions{{}, {Mmap: true}} {
		t.Run(map[bool]string{false: "pread", true: "mmap"}[opts.Mmap], func(t *testing.T) {
			b, path := newTestBackend(t, 1<<20, opts)
			if b.Size() != 1<<20 || b.Config().Size != 1<<20 || !b.Config().Discard {
				t.Fatalf("size %d config %+v", b.Size(), b.Config())
			}
			w := request(OpWrite, FlagFUA, 8192, 8192, true)
			for i := range w.Buf {
				w.Buf[i] = byte(i)
			}
			if err := b.Handle(w); err != nil {
				t.Fatalf("write: %v", err)
			}
			r := request(OpRead, 0, 8192, 8192, true)
			if err := b.Handle(r); err != nil || !bytes.Equal(r.Buf, w.Buf) {
				t.Fatalf("read back: %v", err)
			}
			if err := b.Handle(request(OpFlush, 0, 0, 0, true)); err != nil {
				t.Fatalf("flush: %v", err)
			}
			if err := b.Handle(request(OpDiscard, 0, 0, 4096, true)); err != nil {
				t.Fatalf("discard: %v", err)
			}
			if err := b.Handle(request(OpWriteZeroes, FlagNoUnmap, 4096, 4096, true)); err != nil {
				t.Fatalf("write zeroes (no unmap): %v", err)
			}
			if err := b.Handle(request(OpWriteZeroes, 0, 16384, 4096, true)); err != nil {
				t.Fatalf("write zeroes: %v", err)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data[:8192], make([]byte, 8192)) || !bytes.Equal(data[16384:20480], make([]byte, 4096)) {
				t.Fatal("discarded/zeroed ranges are not zero")
			}
			if !bytes.Equal(data[8192:16384], w.Buf[:8192]) || data[20480] != 0xaa {
				t.Fatal("data outside the zeroed ranges changed")
			}
		})
	}
}

func TestFileBackendMmapBounds(t *testing.T) {
	b, _ := newTestBackend(t, 64<<10, FileOptions{Mmap: true})
	err := b.Handle(request(OpRead, 0, 60<<10, 8192, true))
	if !errors.Is(err, unix.EIO) {
		t.Fatalf("read past the mapping: %v, want EIO", err)
	}
}

func TestFileBackendOffload(t *testing.T) {
	b, _ := newTestBackend(t, 64<<10, FileOptions{Offload: true})
	if err := b.Handle(request(OpWrite, 0, 0, 4096, true)); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("NoWait write with Offload: %v, want ErrWouldBlock", err)
	}
	if err := b.Handle(request(OpWrite, 0, 0, 4096, false)); err != nil {
		t.Fatalf("blocking write: %v", err)
	}
	// A cached read may succeed on the queue thread or ask for a worker.
	if err := b.Handle(request(OpRead, 0, 0, 4096, true)); err != nil && !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("NoWait read: %v", err)
	}
	if err := b.Handle(request(OpRead, 0, 0, 64<<10, true)); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("NoWait 64 KiB read with Offload: %v, want ErrWouldBlock", err)
	}
	m, _ := newTestBackend(t, 64<<10, FileOptions{Offload: true, Mmap: true})
	if err := m.Handle(request(OpWrite, 0, 0, 4096, true)); err != nil {
		t.Fatalf("small mapped NoWait write with Offload: %v", err)
	}
}

func TestFileBackendRejectsOtherFiles(t *testing.T) {
	if _, err := OpenFileBackend(t.TempDir(), FileOptions{}); err == nil {
		t.Fatal("a directory was accepted as a backing file")
	}
}
