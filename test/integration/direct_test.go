//go:build vmtest

package integration

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestDirectBacking: a filtered device over a block device, and over a
// file on ext4, reads and writes its backing past the page cache
// (O_DIRECT) in the kernel's default I/O mode, and says so in status; one
// over a tmpfs file, which is memory already, does not. Over each direct
// backing fio writes and verifies 4 KiB random, 1 MiB sequential and
// mixed unaligned sizes, a snapshot image keeps the data of the take while
// the original is overwritten, the backing holds what fio wrote after the
// device is gone, and the backing's page cache stays empty all along: the
// data is cached once, above, not twice.
func TestDirectBacking(t *testing.T) {
	const size = 32 << 20
	jobs := []fioVerifyJob{{4 << 10, 16, 0, 4 << 20}, {1 << 20, 8, 4 << 20, 8 << 20}, {0, 16, 12 << 20, 4 << 20}}
	d := startDaemon(t)
	fsDir := mkfsMount(t, loopDevice(t, tempFile(t, 2*size)))
	for _, tc := range []struct {
		name    string
		backing func() string
		direct  bool
	}{
		{"block-device", func() string { return loopDevice(t, tempFile(t, size)) }, true},
		{"ext4-file", func() string { return sizedFile(t, filepath.Join(fsDir, "backing.img"), size) }, true},
		{"tmpfs-file", func() string { return tempFile(t, size) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backing := tc.backing()
			dropCache(t, backing)
			dev := d.cli("attach", "--backing", backing)
			defer d.try("detach", "--device", dev)
			st := d.status()
			if len(st.Devices) != 1 || st.Devices[0].DirectIO != tc.direct {
				t.Fatalf("status %+v: want one device with direct_io %v", st.Devices, tc.direct)
			}
			t.Logf("%s over %s: %s mode, direct_io %v", dev, backing, st.Devices[0].IOMode, st.Devices[0].DirectIO)
			if !tc.direct {
				return
			}
			fioVerify(t, dev, jobs, "--direct=1")
			fillRandom(t, dev, 16<<20, 16<<20)
			before := deviceMD5(t, dev)
			id, images := d.snapshot(t.TempDir(), "64MiB", dev)
			fio(t, "--name=overwrite", "--filename="+dev, "--offset=16M", "--size=16M", "--rw=randwrite",
				"--bsrange=4k-1m", "--ioengine=io_uring", "--iodepth=16", "--direct=1", "--randseed=3")
			if got := deviceMD5(t, images[0]); got != before {
				t.Errorf("image md5 %s, want %s (the device at the take)", got, before)
			}
			d.cli("snapshot", "destroy", "--id", id)
			// Buffered, fio's 16 MiB of writes and the reads of the image
			// would be 8192 pages of it; a probe of the device by udev
			// may leave a few.
			if n := residentPages(t, backing); n > 64 {
				t.Errorf("%d pages of the backing in the page cache after direct I/O, want at most 64", n)
			}
			d.cli("detach", "--device", dev)
			fioVerify(t, backing, jobs, "--verify_only=1")
		})
	}
}

// sizedFile creates a file of size bytes, allocated, at path.
func sizedFile(t testing.TB, path string, size int64) string {
	t.Helper()
	run(t, "fallocate", "-l", fmt.Sprint(size), path)
	t.Cleanup(func() { os.Remove(path) })
	return path
}

// dropCache writes back and drops what the page cache holds of path, a
// file or a block device.
func dropCache(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// residentPages counts the pages of path, a file or a block device, in
// the page cache (mincore of a mapping, which reads nothing).
func residentPages(t testing.TB, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore %s: %v", path, e)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}
