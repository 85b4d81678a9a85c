//go:build vmtest

package integration

import (
	"bytes"
	"math/rand"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
	"golang.org/x/sys/unix"
)

// TestUblkExt4: mkfs.ext4, mount, write a tree, umount, fsck -fn clean,
// remount, checksums match.
func TestUblkExt4(t *testing.T) {
	d, _, _ := ublkDevice(t, 128<<20, 2, 128, nil)
	dir := mkfsMount(t, d.Path())
	sums := writeTree(t, dir, 300)
	run(t, "umount", dir)
	run(t, "fsck.ext4", "-fn", d.Path())
	run(t, "mount", d.Path(), dir)
	checkTree(t, dir, sums)
	run(t, "umount", dir)
}

// flushCounter counts FLUSH requests and remembers whether one arrived
// after the marked write.
type flushCounter struct {
	ublk.Handler
	flushes atomic.Int64
}

func (f *flushCounter) Handle(r *ublk.Request) error {
	if r.Op == ublk.OpFlush {
		f.flushes.Add(1)
	}
	return f.Handler.Handle(r)
}

// TestUblkFlush: data written with O_DIRECT and then fsync'ed reaches the
// backing file before fsync returns, and the fsync reaches the handler as
// a FLUSH (the device announces a volatile cache).
func TestUblkFlush(t *testing.T) {
	var fc *flushCounter
	d, file, _ := ublkDevice(t, 16<<20, 1, 32, func(b ublk.Handler, _ *storage.File) ublk.Handler {
		fc = &flushCounter{Handler: b}
		return fc
	})
	f, err := os.OpenFile(d.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	back, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	buf, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 20; i++ {
		rng.Read(buf)
		off := int64(rng.Intn(200)) * 64 << 10
		before := fc.flushes.Load()
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatalf("O_DIRECT write at %d: %v", off, err)
		}
		if err := f.Sync(); err != nil {
			t.Fatalf("fsync: %v", err)
		}
		if fc.flushes.Load() == before {
			t.Fatalf("round %d: fsync returned without a FLUSH reaching the handler", i)
		}
		got := make([]byte, len(buf))
		if _, err := back.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, buf) {
			t.Fatalf("round %d: backing file at %d differs from the data fsync'ed", i, off)
		}
	}
}

// TestUblkDiscardZeroes: blkdiscard punches the backing file, blkdiscard -z
// zeroes; both read back as zeros.
func TestUblkDiscardZeroes(t *testing.T) {
	d, file, _ := ublkDevice(t, 32<<20, 1, 32, nil)
	fio(t, "--name=fill", "--filename="+d.Path(), "--rw=write", "--bs=1M", "--size=32M", "--direct=1", "--ioengine=io_uring")
	blocks := func() int64 {
		var st unix.Stat_t
		if err := unix.Stat(file, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	full := blocks()
	run(t, "blkdiscard", "-o", "0", "-l", "8M", d.Path())
	if got := blocks(); got > full-8<<20 {
		t.Fatalf("discard of 8 MiB left %d of %d allocated bytes", got, full)
	}
	run(t, "blkdiscard", "-z", "-o", "8M", "-l", "8M", d.Path())
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[:16<<20], make([]byte, 16<<20)) {
		t.Fatal("discarded or zeroed range does not read back as zeros in the backing file")
	}
	if bytes.Equal(data[16<<20:17<<20], make([]byte, 1<<20)) {
		t.Fatal("the rest of the device was zeroed too")
	}
	// The device's own view (O_DIRECT, bypassing its page cache).
	out := run(t, "cmp", "-n", "16777216", d.Path(), "/dev/zero")
	_ = out
}

// TestUblkStopUnderLoad: closing the device while fio runs ends fio with
// I/O errors instead of a hang, and the device is deleted.
func TestUblkStopUnderLoad(t *testing.T) {
	d, _, _ := ublkDevice(t, 64<<20, 2, 64, nil)
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := runErr("fio", "--name=load", "--filename="+d.Path(), "--rw=randrw", "--bs=4k",
			"--direct=1", "--ioengine=io_uring", "--iodepth=32", "--numjobs=2", "--time_based", "--runtime=120")
		done <- result{out, err}
	}()
	time.Sleep(3 * time.Second)
	select {
	case r := <-done:
		t.Fatalf("fio ended before the stop: %v\n%s", r.err, r.out)
	default:
	}
	start := time.Now()
	closeDevice(t, d)
	t.Logf("Close under load took %v", time.Since(start))
	select {
	case r := <-done:
		if r.err == nil {
			t.Fatalf("fio succeeded although the device was stopped under it:\n%s", r.out)
		}
		t.Logf("fio ended %v after the stop with %v", time.Since(start), r.err)
	case <-time.After(60 * time.Second):
		t.Fatal("fio still running 60 s after the device was stopped")
	}
	requireNoUblkDevices(t, "after stop under load")
}
