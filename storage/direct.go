package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Direct I/O (OpenOptions.Direct). A File keeps two descriptors of the
// same file: fd through the page cache and dfd past it (O_DIRECT), as the
// loop device with --direct-io=on and ublksrv's loop target read and
// write their backing. The data path uses dfd (DataFD): a device
// presented over the file caches its data once, in its own page cache,
// not a second time below it. dfd takes only I/O whose offset, length and
// memory are aligned to dioMask+1, which is at most the logical block
// size: every block request is. ReadAt and WriteAt take dfd when they
// can; an unaligned read goes through an aligned buffer of its own, so
// the page cache of the file stays empty and never stale, and an
// unaligned write goes through fd, whose cached pages the kernel writes
// back and drops before the next direct I/O over them.

// openNoAtime opens path with flag and O_NOATIME, or without O_NOATIME
// where it is not allowed (it needs ownership of the file).
func openNoAtime(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_NOATIME, 0)
	if errors.Is(err, unix.EPERM) {
		f, err = os.OpenFile(path, flag, 0)
	}
	return f, err
}

// openDirect opens d's file a second time with O_DIRECT when its file
// system takes direct I/O aligned to d's logical block size, and says why
// not otherwise.
func (d *File) openDirect() error {
	if d.memory {
		return errors.New("the file is in memory (tmpfs or ramfs): there is no cache below it to skip")
	}
	offAlign, memAlign, err := d.directAlignment()
	if err != nil {
		return err
	}
	if offAlign > d.geo.LogicalBlockSize || memAlign > SectorSize {
		return fmt.Errorf("direct I/O needs %d-byte offsets and %d-byte memory alignment, more than the %d-byte blocks the device presents", offAlign, memAlign, d.geo.LogicalBlockSize)
	}
	if d.stableWrites() {
		// A direct write may hand the disk pages that their owner
		// changes meanwhile (a zero-copy request's); a copy into the
		// page cache does not.
		return errors.New("the disk needs pages kept stable while they are written (queue/stable_writes)")
	}
	// The same file through /proc, not the path again: the path may name
	// another file by now. A block device's second open is not exclusive:
	// the first holds it.
	df, err := openNoAtime("/proc/self/fd/"+strconv.Itoa(d.fd), os.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open with O_DIRECT: %w", err)
	}
	d.df, d.dfd, d.dioMask = df, int(df.Fd()), int64(max(offAlign, memAlign)-1)
	return nil
}

// directAlignment returns the alignment of file offsets and of memory
// that direct I/O of d needs (statx STATX_DIOALIGN; for a block device
// on a kernel without it, its logical block size).
func (d *File) directAlignment() (offAlign, memAlign int, err error) {
	var stx unix.Statx_t
	err = unix.Statx(d.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	switch {
	case err == nil && stx.Mask&unix.STATX_DIOALIGN != 0 && stx.Dio_offset_align == 0:
		return 0, 0, errors.New("the file system has no direct I/O")
	case err == nil && stx.Mask&unix.STATX_DIOALIGN != 0:
		return int(stx.Dio_offset_align), int(stx.Dio_mem_align), nil
	case d.block:
		// The memory alignment of nearly every disk; a request that needs
		// more fails with EINVAL, which the data path takes.
		return d.geo.LogicalBlockSize, SectorSize, nil
	}
	return 0, 0, errors.New("the kernel does not report the file's direct I/O alignment (statx STATX_DIOALIGN)")
}

// stableWrites reports whether the disk under d (d itself, or the device
// of d's file system) asks for stable pages during writes: the
// queue/stable_writes of its sysfs entry, or of the disk whose partition
// it is.
func (d *File) stableWrites() bool {
	var st unix.Stat_t
	if unix.Fstat(d.fd, &st) != nil {
		return false
	}
	dev := st.Dev
	if d.block {
		dev = st.Rdev
	}
	entry := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev))
	for _, p := range []string{entry + "/queue/stable_writes", entry + "/../queue/stable_writes"} {
		if b, err := os.ReadFile(p); err == nil {
			return strings.TrimSpace(string(b)) == "1"
		}
	}
	return false
}

// aligned reports whether a transfer of p at off can go through dfd.
func (d *File) aligned(p []byte, off int64) bool {
	addr := int64(uintptr(unsafe.Pointer(unsafe.SliceData(p))))
	return (addr|off|int64(len(p)))&d.dioMask == 0
}

// directAt reads (or writes) all of p at off through dfd, retrying on
// EINTR and short transfers. Reading at the end of the file returns
// io.EOF.
func (d *File) directAt(p []byte, off int64, write bool) (int, error) {
	op, transfer := "read", unix.Pread
	if write {
		op, transfer = "write", unix.Pwrite
	}
	done := 0
	for done < len(p) {
		n, err := transfer(d.dfd, p[done:], off+int64(done))
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return done, fmt.Errorf("%s %s at %d (O_DIRECT): %w", op, d.Name(), off+int64(done), err)
		case n == 0 && write:
			return done, fmt.Errorf("write %s at %d: %w", d.Name(), off+int64(done), io.ErrShortWrite)
		case n == 0:
			return done, io.EOF
		}
		done += n
	}
	return done, nil
}

// readBounced reads p at off through dfd by way of an aligned buffer that
// covers it.
func (d *File) readBounced(p []byte, off int64) (int, error) {
	start := off &^ d.dioMask
	end := (off + int64(len(p)) + d.dioMask) &^ d.dioMask
	b := alignedBuffer(int(end-start), d.dioMask)
	n, err := d.directAt(b, start, false)
	got := copy(p, b[min(off-start, int64(n)):n])
	if got == len(p) {
		return got, nil
	}
	return got, err
}

// zeros returns zeros to write with WriteAt: under direct I/O a buffer of
// its own, aligned so that the writes go past the page cache too (rare:
// only where the file system cannot zero a range itself).
func (d *File) zeros() []byte {
	if d.dfd < 0 {
		return zeroBlock[:]
	}
	return alignedBuffer(len(zeroBlock), d.dioMask)
}

// alignedBuffer returns n zero bytes at an address aligned to mask+1.
func alignedBuffer(n int, mask int64) []byte {
	raw := make([]byte, int64(n)+mask)
	skip := -int64(uintptr(unsafe.Pointer(unsafe.SliceData(raw)))) & mask
	return raw[skip : skip+int64(n)]
}
