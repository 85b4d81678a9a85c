package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
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
		return d.geo.LogicalBlockSize, d.geo.LogicalBlockSize, nil
	}
	return 0, 0, errors.New("the kernel does not report the file's direct I/O alignment (statx STATX_DIOALIGN)")
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
	raw := make([]byte, end-start+d.dioMask)
	skip := -int64(uintptr(unsafe.Pointer(unsafe.SliceData(raw)))) & d.dioMask
	b := raw[skip : skip+end-start]
	n, err := d.directAt(b, start, false)
	got := copy(p, b[min(off-start, int64(n)):n])
	if got == len(p) {
		return got, nil
	}
	return got, err
}
