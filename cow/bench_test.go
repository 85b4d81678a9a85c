package cow

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/storage"
)

const (
	benchDevSize = 512 << 20 // the original device
	benchIO      = 1 << 20   // one request
	benchChunk   = 256 << 10 // default chunk size
)

// benchDir returns a directory on tmpfs (/dev/shm) when there is one, so
// that the benchmarks measure the engine rather than a disk.
func benchDir(b *testing.B) string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		dir, err := os.MkdirTemp("/dev/shm", "ublksnap-bench-")
		if err == nil {
			b.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return b.TempDir()
}

// benchFile creates a file of size bytes, filled with data, in dir.
func benchFile(b *testing.B, dir, name string, size int64) string {
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	return path
}

// benchSnapshot is an original file with a snapshot whose difference
// storage is an unnamed file in the same directory.
type benchSnapshot struct {
	dir  string
	dev  *storage.File
	orig *Original
	da   *DiffArea
	ds   *storage.DiffStorage
}

func newBenchSnapshot(b *testing.B) *benchSnapshot {
	dir := benchDir(b)
	dev, err := storage.Open(benchFile(b, dir, "orig", benchDevSize))
	if err != nil {
		b.Fatal(err)
	}
	s := &benchSnapshot{dir: dir, dev: dev, orig: NewOriginal(dev)}
	s.take(b)
	b.Cleanup(func() { s.release(); dev.Close() })
	return s
}

// take takes a new snapshot (all chunks New again).
func (s *benchSnapshot) take(b *testing.B) {
	p := DefaultParams()
	p.DiffStorageMinimum = 262144 // 128 MiB, as the blksnap tests use
	ds, err := storage.NewFile(s.dir, 2*benchDevSize>>storage.SectorShift, storage.Options{MinimumSectors: p.DiffStorageMinimum})
	if err != nil {
		b.Fatal(err)
	}
	da, err := NewDiffArea(s.dev, ds, p, nil)
	if err != nil {
		b.Fatal(err)
	}
	s.ds, s.da = ds, da
	s.orig.SetDiffArea(da)
}

func (s *benchSnapshot) release() {
	s.orig.SetDiffArea(nil)
	s.da.Close(context.Background())
	s.ds.Close()
}

// BenchmarkCOWFirstWrite: sequential 1 MiB writes to the original, each
// over New chunks (load, queue, store by the worker, then the write).
func BenchmarkCOWFirstWrite(b *testing.B) {
	s := newBenchSnapshot(b)
	data := make([]byte, benchIO)
	ctx := context.Background()
	b.SetBytes(benchIO)
	b.ReportAllocs()
	b.ResetTimer()
	off := int64(0)
	for range b.N {
		if off == benchDevSize {
			b.StopTimer()
			waitStoreIdle(s.da)
			s.release()
			s.take(b)
			off = 0
			b.StartTimer()
		}
		if err := s.orig.Write(ctx, off, data, false); err != nil {
			b.Fatal(err)
		}
		off += benchIO
	}
	waitStoreIdle(s.da)
}

// BenchmarkRawCopyBound moves the same bytes as BenchmarkCOWFirstWrite
// with plain pread/pwrite: per chunk one read of the original and one
// write to a storage file, then the user write. Like the difference
// storage of a new snapshot, the storage file is new for every pass over
// the device, so its pages are allocated as they are written.
func BenchmarkRawCopyBound(b *testing.B) {
	dir := benchDir(b)
	orig, err := os.OpenFile(benchFile(b, dir, "orig", benchDevSize), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer orig.Close()
	var diff *os.File
	newDiff := func() {
		if diff != nil {
			diff.Close()
		}
		if diff, err = os.OpenFile(dir, os.O_RDWR|unix.O_TMPFILE, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	newDiff()
	defer func() { diff.Close() }()
	data := make([]byte, benchIO)
	chunk := make([]byte, benchChunk)
	b.SetBytes(benchIO)
	b.ReportAllocs()
	b.ResetTimer()
	off := int64(0)
	for range b.N {
		if off == benchDevSize {
			b.StopTimer()
			newDiff()
			off = 0
			b.StartTimer()
		}
		for c := off; c < off+benchIO; c += benchChunk {
			if _, err := orig.ReadAt(chunk, c); err != nil {
				b.Fatal(err)
			}
			if _, err := diff.WriteAt(chunk, c); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := orig.WriteAt(data, off); err != nil {
			b.Fatal(err)
		}
		off += benchIO
	}
}

// region is the part of the device the overwrite and image-read
// benchmarks use: all of its chunks are copied before they start.
const region = 64 << 20

// newCopiedSnapshot returns a snapshot whose first region bytes have been
// written once (so their chunks are stored) and a 1 MiB request buffer.
func newCopiedSnapshot(b *testing.B) (*benchSnapshot, []byte) {
	s := newBenchSnapshot(b)
	data := make([]byte, benchIO)
	for off := int64(0); off < region; off += benchIO {
		if err := s.orig.Write(context.Background(), off, data, false); err != nil {
			b.Fatal(err)
		}
	}
	waitStoreIdle(s.da)
	return s, data
}

// runOverRegion times b.N calls of op on successive 1 MiB offsets of the
// region, reporting throughput.
func runOverRegion(b *testing.B, op func(off int64) error) {
	b.SetBytes(benchIO)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if err := op(int64(i) * benchIO % region); err != nil {
			b.Fatal(err)
		}
	}
}

// plainFile opens a region-sized file of data on tmpfs, for the plain
// pread/pwrite baselines.
func plainFile(b *testing.B) *os.File {
	f, err := os.OpenFile(benchFile(b, benchDir(b), "orig", region), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return f
}

// BenchmarkOverwrite: 1 MiB writes to the original over chunks already
// copied (no COW work beyond looking at the chunk states).
func BenchmarkOverwrite(b *testing.B) {
	s, data := newCopiedSnapshot(b)
	runOverRegion(b, func(off int64) error { return s.orig.Write(context.Background(), off, data, false) })
}

// BenchmarkPlainPwrite: the same writes as BenchmarkOverwrite with pwrite
// on a file.
func BenchmarkPlainPwrite(b *testing.B) {
	f, data := plainFile(b), make([]byte, benchIO)
	runOverRegion(b, func(off int64) error { _, err := f.WriteAt(data, off); return err })
}

// BenchmarkImageRead: 1 MiB reads of the image over chunks stored in the
// difference storage.
func BenchmarkImageRead(b *testing.B) {
	s, data := newCopiedSnapshot(b)
	runOverRegion(b, func(off int64) error { return s.da.ReadImage(context.Background(), data, off, false) })
}

// BenchmarkPlainPread: the same reads as BenchmarkImageRead with pread on
// a file.
func BenchmarkPlainPread(b *testing.B) {
	f, data := plainFile(b), make([]byte, benchIO)
	runOverRegion(b, func(off int64) error { _, err := f.ReadAt(data, off); return err })
}
