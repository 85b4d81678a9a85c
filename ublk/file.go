package ublk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FileBackend is a pass-through Handler over a backing file or block
// device: request offsets are file offsets. READ and WRITE are pread and
// pwrite, FLUSH is fdatasync, FUA writes use RWF_DSYNC, DISCARD punches a
// hole (BLKDISCARD on block devices) and WRITE_ZEROES zeroes the range
// (punching a hole unless FlagNoUnmap; BLKZEROOUT on block devices).
//
// By default it serves every request synchronously on the queue thread,
// which is the fastest choice for backing files whose data is in memory
// (tmpfs, page cache). With FileOptions.Offload, NoWait requests that may
// block go to the queue's blocking workers; reads are first tried with
// RWF_NOWAIT. With FileOptions.Mmap, reads and writes of a regular file copy
// through a shared mapping of the file instead of pread/pwrite.
//
// A FileBackend is safe for concurrent use.
type FileBackend struct {
	f        *os.File    // backing file; closed by Close
	fd       int         // f's descriptor; immutable
	size     int64       // bytes; immutable
	blockDev bool        // f is a block device; immutable
	opts     FileOptions // immutable
	mapped   []byte      // MAP_SHARED view of the file with FileOptions.Mmap; immutable
}

// FileOptions tune a FileBackend.
type FileOptions struct {
	// Offload sends NoWait requests that may block, and reads and writes
	// of 64 KiB or more, to the blocking workers instead of serving them on
	// the queue thread. Small reads are first tried with RWF_NOWAIT; small
	// mapped (Mmap) reads and writes stay on the queue thread.
	Offload bool
	// Mmap copies read and write data through a shared mapping of a regular
	// backing file instead of pread/pwrite: no system call per request and a
	// plain memory copy instead of copy_to/from_user. A page fault on the
	// mapping (an I/O error under it, or a file truncated behind the
	// backend's back) fails the request with EIO instead of crashing. The
	// first touch of each page may block in a page fault, so it fits files
	// whose data is in memory (tmpfs) or with Offload.
	Mmap bool
}

var _ Handler = (*FileBackend)(nil)

// offloadMin is the request size from which Offload moves reads and writes
// to a worker.
const offloadMin = 64 << 10

// OpenFileBackend opens path (a regular file or a block device) for reading
// and writing.
func OpenFileBackend(path string, opts FileOptions) (*FileBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("ublk: backing file: %w", err)
	}
	b, err := NewFileBackend(f, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

// NewFileBackend wraps an open file; the backend owns f from then on (Close
// closes it).
func NewFileBackend(f *os.File, opts FileOptions) (*FileBackend, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("ublk: stat %s: %w", f.Name(), err)
	}
	b := &FileBackend{f: f, fd: int(f.Fd()), opts: opts}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		b.size = st.Size
	case unix.S_IFBLK:
		b.blockDev = true
		n, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return nil, fmt.Errorf("ublk: size of %s: %w", f.Name(), err)
		}
		b.size = n
	default:
		return nil, fmt.Errorf("ublk: %s is neither a regular file nor a block device", f.Name())
	}
	if opts.Mmap {
		if b.blockDev || b.size == 0 {
			return nil, fmt.Errorf("ublk: %s: Mmap needs a non-empty regular file", f.Name())
		}
		m, err := unix.Mmap(b.fd, 0, int(b.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return nil, fmt.Errorf("ublk: mmap %s: %w", f.Name(), err)
		}
		b.mapped = m
	}
	return b, nil
}

// Size returns the backing size in bytes.
func (b *FileBackend) Size() int64 { return b.size }

// Config returns DefaultConfig for the backing size with discard and
// write-zeroes enabled. The size is rounded down to 4 KiB.
func (b *FileBackend) Config() Config {
	c := DefaultConfig(b.size &^ (pageSize - 1))
	c.Discard, c.WriteZeroes = true, true
	return c
}

// Close unmaps and closes the backing file. The device must be closed first.
func (b *FileBackend) Close() error {
	var err error
	if b.mapped != nil {
		err = unix.Munmap(b.mapped)
		b.mapped = nil
	}
	return errors.Join(err, b.f.Close())
}

// Handle serves one request; see the type comment.
func (b *FileBackend) Handle(req *Request) error {
	if req.NoWait() && b.opts.Offload {
		switch {
		case req.Length >= offloadMin && (req.Op == OpRead || req.Op == OpWrite):
			// Large copies run on a worker, in parallel with the queue
			// thread's own copies to and from the kernel.
			return ErrWouldBlock
		case b.mapped != nil && (req.Op == OpRead || req.Op == OpWrite):
			// Small mapped copies stay on the queue thread.
		case req.Op == OpRead:
			n, err := unix.Preadv2(b.fd, [][]byte{req.Buf}, req.Offset, unix.RWF_NOWAIT)
			if err != nil || n != len(req.Buf) {
				return ErrWouldBlock
			}
			return nil
		default:
			return ErrWouldBlock
		}
	}
	switch {
	case req.Op == OpRead && b.mapped != nil:
		return b.copyMapped(req.Buf, req.Offset, false)
	case req.Op == OpWrite && b.mapped != nil:
		if err := b.copyMapped(req.Buf, req.Offset, true); err != nil {
			return err
		}
		if req.Flags&FlagFUA != 0 {
			return b.syncMapped(req.Offset, len(req.Buf))
		}
		return nil
	}
	switch req.Op {
	case OpRead:
		return b.read(req.Buf, req.Offset)
	case OpWrite:
		return b.write(req.Buf, req.Offset, req.Flags&FlagFUA != 0)
	case OpFlush:
		return b.flush()
	case OpDiscard:
		return b.discard(req.Offset, int64(req.Length))
	case OpWriteZeroes:
		return b.writeZeroes(req.Offset, int64(req.Length), req.Flags&FlagNoUnmap != 0)
	}
	return unix.EOPNOTSUPP
}

// copyMapped copies between buf and the mapping at off, turning a fault on
// the mapping into EIO.
func (b *FileBackend) copyMapped(buf []byte, off int64, toFile bool) (err error) {
	if off < 0 || off+int64(len(buf)) > int64(len(b.mapped)) {
		return fmt.Errorf("ublk: %d bytes at %d beyond the mapped %d bytes: %w", len(buf), off, len(b.mapped), unix.EIO)
	}
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			err = fmt.Errorf("ublk: fault on the backing file mapping at %d: %v: %w", off, r, unix.EIO)
		}
	}()
	if toFile {
		copy(b.mapped[off:], buf)
	} else {
		copy(buf, b.mapped[off:])
	}
	return nil
}

// syncMapped makes a mapped range durable (FUA).
func (b *FileBackend) syncMapped(off int64, n int) error {
	start := off &^ (pageSize - 1)
	if err := unix.Msync(b.mapped[start:off+int64(n)], unix.MS_SYNC); err != nil {
		return fmt.Errorf("ublk: msync %d bytes at %d: %w", n, off, err)
	}
	return nil
}

// read fills buf from off; bytes past the end of the file read as zeros.
func (b *FileBackend) read(buf []byte, off int64) error {
	for len(buf) > 0 {
		n, err := unix.Pread(b.fd, buf, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("ublk: pread %d bytes at %d: %w", len(buf), off, err)
		}
		if n == 0 {
			clear(buf)
			return nil
		}
		buf, off = buf[n:], off+int64(n)
	}
	return nil
}

func (b *FileBackend) write(buf []byte, off int64, fua bool) error {
	flags := 0
	if fua {
		flags = unix.RWF_DSYNC
	}
	for len(buf) > 0 {
		var n int
		var err error
		if flags != 0 {
			n, err = unix.Pwritev2(b.fd, [][]byte{buf}, off, flags)
		} else {
			n, err = unix.Pwrite(b.fd, buf, off)
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.EOPNOTSUPP && flags != 0 {
			flags = 0 // no RWF_DSYNC: write, then fdatasync below
			continue
		}
		if err != nil {
			return fmt.Errorf("ublk: pwrite %d bytes at %d: %w", len(buf), off, err)
		}
		if n == 0 {
			return fmt.Errorf("ublk: pwrite at %d: %w", off, io.ErrShortWrite)
		}
		buf, off = buf[n:], off+int64(n)
	}
	if fua && flags == 0 {
		return b.flush()
	}
	return nil
}

func (b *FileBackend) flush() error {
	if err := unix.Fdatasync(b.fd); err != nil {
		return fmt.Errorf("ublk: fdatasync: %w", err)
	}
	return nil
}

// ioctlRange issues BLKDISCARD or BLKZEROOUT on [off, off+n).
func (b *FileBackend) ioctlRange(req uint, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(b.fd), uintptr(req), uintptr(unsafe.Pointer(&r))); errno != 0 {
		return errno
	}
	return nil
}

func (b *FileBackend) discard(off, n int64) error {
	var err error
	if b.blockDev {
		err = b.ioctlRange(unix.BLKDISCARD, off, n)
	} else {
		err = unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	if errors.Is(err, unix.EOPNOTSUPP) {
		return nil // discard is a hint
	}
	if err != nil {
		return fmt.Errorf("ublk: discard %d bytes at %d: %w", n, off, err)
	}
	return nil
}

func (b *FileBackend) writeZeroes(off, n int64, noUnmap bool) error {
	if b.blockDev {
		if err := b.ioctlRange(unix.BLKZEROOUT, off, n); err != nil {
			return fmt.Errorf("ublk: BLKZEROOUT %d bytes at %d: %w", n, off, err)
		}
		return nil
	}
	modes := []int{unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE}
	if noUnmap {
		modes[0], modes[1] = modes[1], modes[0]
	}
	for _, mode := range modes {
		err := unix.Fallocate(b.fd, uint32(mode), off, n)
		if err == nil {
			if noUnmap && mode&unix.FALLOC_FL_PUNCH_HOLE != 0 {
				// Re-allocate the punched range; failure is harmless.
				_ = unix.Fallocate(b.fd, unix.FALLOC_FL_KEEP_SIZE, off, n)
			}
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("ublk: zero %d bytes at %d: %w", n, off, err)
		}
	}
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if err := b.write(zero[:k], off, false); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}
