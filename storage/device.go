package storage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SectorSize is the unit of all sector counts in this package.
const (
	SectorShift = 9
	SectorSize  = 1 << SectorShift
)

// Geometry describes a backing device. All sizes are in bytes.
type Geometry struct {
	Size              int64 // capacity; a multiple of LogicalBlockSize
	LogicalBlockSize  int   // smallest addressable unit, a power of two >= 512
	PhysicalBlockSize int   // smallest unit written without read-modify-write
	MinIOSize         int   // preferred minimum I/O size (io_min)
}

// Sectors returns the capacity in sectors.
func (g Geometry) Sectors() int64 { return g.Size >> SectorShift }

// Device is a backing device: the original device of a snapshot or a part of
// a difference storage.
//
// ReadAt and WriteAt follow io.ReaderAt and io.WriterAt: a short transfer
// comes with a non-nil error, and the buffer is not retained after the call.
// They may be called concurrently for disjoint ranges. Geometry is fixed
// except for Size, which a Grower may increase.
type Device interface {
	io.ReaderAt
	io.WriterAt
	io.Closer
	// Name identifies the device in logs and events (its path).
	Name() string
	// Geometry returns the device's current geometry.
	Geometry() Geometry
}

// Flusher is a Device with a volatile write cache.
type Flusher interface {
	// Flush makes all completed writes durable.
	Flush() error
}

// Discarder is a Device that can drop the contents of a range.
type Discarder interface {
	// Discard drops n bytes at off; later reads return unspecified data.
	Discard(off, n int64) error
}

// ZeroWriter is a Device that can zero a range without a data transfer.
type ZeroWriter interface {
	// WriteZeroes makes n bytes at off read back as zeros.
	WriteZeroes(off, n int64) error
}

// Grower is a Device whose size can grow, such as a regular file.
type Grower interface {
	// Grow reserves space so that the device is at least size bytes long.
	Grow(size int64) error
}

// FUAWriter is a Device that can make a single write durable by itself
// (forced unit access) instead of flushing everything written before.
type FUAWriter interface {
	// WriteAtFUA writes p at off and returns once it is durable.
	WriteAtFUA(p []byte, off int64) (int, error)
}

// NoWaitReader is a Device that can try a read without blocking.
type NoWaitReader interface {
	// ReadAtNoWait reads p at off if that needs no waiting (the data is
	// in memory), and fails with ErrWouldBlock otherwise, maybe having
	// filled part of p.
	ReadAtNoWait(p []byte, off int64) (int, error)
}

// ErrWouldBlock is returned by a no-wait read that would have to wait. It
// matches syscall.EAGAIN.
var ErrWouldBlock = fmt.Errorf("storage: read would block: %w", syscall.EAGAIN)

// WriteFUA writes p at off of dev durably: with FUAWriter when dev has it,
// else with a write and a flush.
func WriteFUA(dev Device, p []byte, off int64) error {
	if w, ok := dev.(FUAWriter); ok {
		_, err := w.WriteAtFUA(p, off)
		return err
	}
	if _, err := dev.WriteAt(p, off); err != nil {
		return err
	}
	return Flush(dev)
}

// ReadNoWait reads p at off of dev if that needs no waiting: with
// NoWaitReader when dev has it; a device without it always answers
// ErrWouldBlock.
func ReadNoWait(dev Device, p []byte, off int64) error {
	r, ok := dev.(NoWaitReader)
	if !ok {
		return ErrWouldBlock
	}
	_, err := r.ReadAtNoWait(p, off)
	return err
}

// Flush flushes dev if it is a Flusher, and does nothing otherwise.
func Flush(dev Device) error {
	if f, ok := dev.(Flusher); ok {
		return f.Flush()
	}
	return nil
}

// Discard discards a range of dev if it is a Discarder, and does nothing
// otherwise (discard is a hint).
func Discard(dev Device, off, n int64) error {
	if d, ok := dev.(Discarder); ok {
		return d.Discard(off, n)
	}
	return nil
}

// zeroBlock is the source of zeros for WriteZeroes on devices without
// ZeroWriter. It is never written.
var zeroBlock [64 << 10]byte

// WriteZeroes zeroes a range of dev, with ZeroWriter when dev has it and by
// writing zeros otherwise.
func WriteZeroes(dev Device, off, n int64) error {
	if z, ok := dev.(ZeroWriter); ok {
		return z.WriteZeroes(off, n)
	}
	return writeZeroBlocks(dev, zeroBlock[:], off, n)
}

// writeZeroBlocks writes n zero bytes at off, len(zero) at a time.
func writeZeroBlocks(dev io.WriterAt, zero []byte, off, n int64) error {
	for n > 0 {
		l := min(n, int64(len(zero)))
		if _, err := dev.WriteAt(zero[:l], off); err != nil {
			return err
		}
		off += l
		n -= l
	}
	return nil
}

// File is a Device backed by a regular file or a block device.
//
// A block device is opened with O_EXCL (the kernel refuses it while it is
// mounted or held by another exclusive opener); a regular file is locked
// with flock(LOCK_EX|LOCK_NB), which other ublksnap processes respect.
//
// Reads and writes are pread and pwrite (retried on EINTR and short
// transfers, as os.File does), through the page cache or, with
// OpenOptions.Direct, past it (O_DIRECT, see direct.go); or copies through
// a shared mapping of a regular file with OpenOptions.Mmap. A FUA write is
// pwritev2 with RWF_DSYNC (only that write is made durable), a no-wait
// read preadv2 with RWF_NOWAIT.
type File struct {
	f  *os.File // the open file, read and written through the page cache; immutable
	fd int      // f's descriptor; immutable
	// df is the same file opened a second time with O_DIRECT
	// (OpenOptions.Direct, where the file system takes it), or nil, and
	// dfd its descriptor, or -1; dioMask is the alignment - 1 it needs of
	// offsets, lengths and memory, and directErr why there is no df when
	// Direct was asked. Immutable.
	df        *os.File
	dfd       int
	dioMask   int64
	directErr error
	block     bool // a block device rather than a regular file; immutable
	// tempDir is, for an unnamed file (OpenTemp) that vanishes on close,
	// its directory (opened O_PATH: the path it was reached by may not
	// outlive the request), else nil; linked is the name it was given in
	// tempDir for a successor (DiffStorage.NameUnnamed), or "". Both are
	// guarded by the mutex of the difference storage that holds the file
	// (immutable otherwise).
	tempDir *os.File
	linked  string
	mapped  []byte // MAP_SHARED view of the file with OpenOptions.Mmap; immutable
	memory  bool   // a regular file of tmpfs or ramfs; immutable
	// geo is the geometry at open; its Size is not kept up to date.
	// size is the current size in bytes, read without a lock (an
	// allocation of the difference storage never waits for a growth) and
	// raised by Grow once fallocate has made the room. growMu serialises
	// Grow.
	geo    Geometry
	size   atomic.Int64
	growMu sync.Mutex
}

var (
	_ Device       = (*File)(nil)
	_ Flusher      = (*File)(nil)
	_ Discarder    = (*File)(nil)
	_ ZeroWriter   = (*File)(nil)
	_ Grower       = (*File)(nil)
	_ FUAWriter    = (*File)(nil)
	_ NoWaitReader = (*File)(nil)
)

// OpenOptions tune how Open reaches the data.
type OpenOptions struct {
	// Mmap copies reads and writes of a regular file through a shared
	// mapping of it instead of pread and pwrite: no system call per
	// request. A fault on the mapping (an I/O error under it, a file
	// truncated behind our back) fails the request with EIO instead of
	// crashing. A mapped file cannot grow. It fits files whose data is in
	// memory (tmpfs): a first touch of a page may wait in a page fault.
	Mmap bool
	// Direct reads and writes the data past the page cache (O_DIRECT)
	// where the file system takes direct I/O aligned to the logical
	// block size (block devices, ext4, XFS): a device presented over the
	// file is then not cached twice. Elsewhere (tmpfs, which is memory
	// already) the file is opened as without it, and DirectIOError says
	// why. Not with Mmap.
	Direct bool
}

// Open opens a regular file or a block device for reading and writing,
// exclusively. A regular file reports 512-byte logical blocks and its file
// system's block size as physical block and minimum I/O size.
func Open(path string) (*File, error) { return OpenWith(path, OpenOptions{}) }

// OpenWith is Open with options.
func OpenWith(path string, opts OpenOptions) (*File, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open backing device: %w", err)
	}
	if opts.Mmap && opts.Direct {
		return nil, fmt.Errorf("open backing device %s: mmap and direct I/O exclude each other: %w", path, unix.EINVAL)
	}
	var d *File
	switch {
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		if opts.Mmap {
			return nil, fmt.Errorf("open backing device %s: mmap needs a regular file: %w", path, unix.EINVAL)
		}
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open backing device: %w", err)
		}
		if d, err = newFile(f, true); err != nil {
			return nil, err
		}
	case st.Mode().IsRegular():
		f, err := openNoAtime(path, os.O_RDWR|unix.O_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("open backing device: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			return nil, fmt.Errorf("open backing device: lock %s: %w", path, err)
		}
		if d, err = newFile(f, false); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("open backing device %s: not a regular file or block device: %w", path, unix.EINVAL)
	}
	if opts.Direct {
		d.directErr = d.openDirect()
	}
	if opts.Mmap {
		if d.geo.Size == 0 {
			d.Close()
			return nil, fmt.Errorf("open backing device %s: mmap needs a non-empty file: %w", path, unix.EINVAL)
		}
		if d.mapped, err = unix.Mmap(d.fd, 0, int(d.geo.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
			d.Close()
			return nil, fmt.Errorf("open backing device %s: mmap: %w", path, err)
		}
	}
	return d, nil
}

// OpenTemp creates an unnamed regular file (O_TMPFILE) in dir, readable
// by its owner only. It has no name in the file system and disappears
// when it is closed, unless it was given one (DiffStorage.NameUnnamed:
// without O_EXCL, so that it can be linked).
func OpenTemp(dir string) (*File, error) {
	f, err := os.OpenFile(dir, os.O_RDWR|unix.O_TMPFILE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create unnamed file in %s: %w", dir, err)
	}
	d, err := newFile(f, false)
	if err != nil {
		return nil, err
	}
	if err := d.becomeUnnamed(dir); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// becomeUnnamed records that d is an unnamed file in dir.
func (d *File) becomeUnnamed(dir string) error {
	t, err := os.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open the directory of an unnamed file: %w", err)
	}
	d.tempDir = t
	return nil
}

// newFile probes the geometry of an open file; it closes f on failure.
func newFile(f *os.File, block bool) (*File, error) {
	d := &File{f: f, fd: int(f.Fd()), dfd: -1, block: block}
	var err error
	if block {
		d.geo, err = blockGeometry(int(f.Fd()))
	} else {
		var st unix.Stat_t
		if err = unix.Fstat(int(f.Fd()), &st); err == nil {
			pb := max(int(st.Blksize), SectorSize)
			d.geo = Geometry{Size: st.Size, LogicalBlockSize: SectorSize, PhysicalBlockSize: pb, MinIOSize: pb}
		}
		var fs unix.Statfs_t
		if err == nil && unix.Fstatfs(int(f.Fd()), &fs) == nil {
			d.memory = fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("probe geometry of %s: %w", f.Name(), err)
	}
	d.size.Store(d.geo.Size)
	return d, nil
}

// blockGeometry asks the kernel for a block device's geometry.
func blockGeometry(fd int) (Geometry, error) {
	var size uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); e != 0 {
		return Geometry{}, fmt.Errorf("BLKGETSIZE64: %w", e)
	}
	lbs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
	if err != nil {
		return Geometry{}, fmt.Errorf("BLKSSZGET: %w", err)
	}
	pbs, err := unix.IoctlGetInt(fd, unix.BLKPBSZGET)
	if err != nil {
		return Geometry{}, fmt.Errorf("BLKPBSZGET: %w", err)
	}
	iomin, err := unix.IoctlGetInt(fd, unix.BLKIOMIN)
	if err != nil {
		return Geometry{}, fmt.Errorf("BLKIOMIN: %w", err)
	}
	return Geometry{Size: int64(size), LogicalBlockSize: lbs, PhysicalBlockSize: pbs, MinIOSize: max(iomin, lbs)}, nil
}

// DataFD returns the descriptor the file's data is read and written
// through, for I/O that bypasses File (a ublk queue's ring): the O_DIRECT
// one with DirectIO, whose I/O must be aligned to the logical block size.
// It stays valid until Close.
func (d *File) DataFD() int {
	if d.dfd >= 0 {
		return d.dfd
	}
	return d.fd
}

// CachedFD returns the descriptor that reads and writes through the page
// cache: DataFD without DirectIO. It stays valid until Close.
func (d *File) CachedFD() int { return d.fd }

// InMemory reports whether the file lives in memory (tmpfs, ramfs): its
// reads and writes never wait for a device, and io_uring cannot do them
// without handing each one to a worker thread (those file systems have
// no non-blocking attempt, FMODE_NOWAIT), so a plain pread or pwrite on the
// calling thread is the cheaper way.
func (d *File) InMemory() bool { return d.memory }

// DirectIO reports whether the data is read and written past the page
// cache (O_DIRECT, OpenOptions.Direct).
func (d *File) DirectIO() bool { return d.dfd >= 0 }

// DirectIOError says why a file opened with OpenOptions.Direct is read and
// written through the page cache after all; nil otherwise.
func (d *File) DirectIOError() error { return d.directErr }

// Name returns the path the file was opened with.
func (d *File) Name() string { return d.f.Name() }

// Geometry returns the file's geometry.
func (d *File) Geometry() Geometry {
	geo := d.geo
	geo.Size = d.size.Load()
	return geo
}

// ReadAt reads len(p) bytes at off.
// With DirectIO, an aligned read goes past the page cache and any other
// through an aligned buffer of its own (never through the cache, which
// direct writes would leave stale).
func (d *File) ReadAt(p []byte, off int64) (int, error) {
	switch {
	case d.mapped != nil:
		return d.copyMapped(p, off, false)
	case d.dfd >= 0 && d.aligned(p, off):
		return d.directAt(p, off, false)
	case d.dfd >= 0:
		return d.readBounced(p, off)
	}
	return d.f.ReadAt(p, off)
}

// WriteAt writes len(p) bytes at off. With DirectIO, an aligned write goes
// past the page cache, any other through it (the kernel writes the cached
// range back and drops it before the next direct I/O over it).
func (d *File) WriteAt(p []byte, off int64) (int, error) {
	switch {
	case d.mapped != nil:
		return d.copyMapped(p, off, true)
	case d.dfd >= 0 && d.aligned(p, off):
		return d.directAt(p, off, true)
	}
	return d.f.WriteAt(p, off)
}

// ReadAtNoWait reads len(p) bytes at off with RWF_NOWAIT: only what is in
// the page cache; ErrWouldBlock otherwise, always with DirectIO (a direct
// read waits for the device). Through a mapping it copies (a page fault
// may wait).
func (d *File) ReadAtNoWait(p []byte, off int64) (int, error) {
	switch {
	case d.mapped != nil:
		return d.copyMapped(p, off, false)
	case d.memory:
		return d.ReadAt(p, off) // never waits, and RWF_NOWAIT is refused
	case d.dfd >= 0:
		return 0, ErrWouldBlock
	}
	done := 0
	for done < len(p) {
		n, err := unix.Preadv2(d.fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_NOWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN || err == unix.EOPNOTSUPP || (err == nil && n == 0):
			return done, ErrWouldBlock
		case err != nil:
			return done, fmt.Errorf("read %s at %d: %w", d.Name(), off, err)
		}
		done += n
	}
	return done, nil
}

// WriteAtFUA writes p at off and makes that write durable with RWF_DSYNC
// (msync of its pages through a mapping); where RWF_DSYNC is not
// supported, with a write and fdatasync.
func (d *File) WriteAtFUA(p []byte, off int64) (int, error) {
	if d.mapped != nil {
		n, err := d.copyMapped(p, off, true)
		if err != nil {
			return n, err
		}
		start := off &^ (int64(os.Getpagesize()) - 1)
		if err := unix.Msync(d.mapped[start:off+int64(n)], unix.MS_SYNC); err != nil {
			return n, fmt.Errorf("msync %s [%d+%d]: %w", d.Name(), off, n, err)
		}
		return n, nil
	}
	fd := d.fd
	if d.dfd >= 0 && d.aligned(p, off) {
		fd = d.dfd
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pwritev2(fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EOPNOTSUPP:
			if _, err := d.WriteAt(p[done:], off+int64(done)); err != nil {
				return done, err
			}
			return len(p), d.Flush()
		case err != nil:
			return done, fmt.Errorf("write %s at %d: %w", d.Name(), off, err)
		case n == 0:
			return done, fmt.Errorf("write %s at %d: %w", d.Name(), off, io.ErrShortWrite)
		}
		done += n
	}
	return done, nil
}

// copyMapped copies between p and the mapping at off, turning a fault on
// the mapping into EIO.
func (d *File) copyMapped(p []byte, off int64, toFile bool) (n int, err error) {
	if off < 0 || off > int64(len(d.mapped)) || int64(len(p)) > int64(len(d.mapped))-off {
		return 0, fmt.Errorf("%s: %d bytes at %d beyond the mapped %d bytes: %w", d.Name(), len(p), off, len(d.mapped), unix.EIO)
	}
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			n, err = 0, fmt.Errorf("%s: fault on the mapping at %d: %v: %w", d.Name(), off, r, unix.EIO)
		}
	}()
	if toFile {
		return copy(d.mapped[off:], p), nil
	}
	return copy(p, d.mapped[off:]), nil
}

// Stat returns the file's status (fstat).
func (d *File) Stat() (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return st, fmt.Errorf("stat %s: %w", d.Name(), err)
	}
	return st, nil
}

// same reports whether st (of a path) is this file or block device.
func (d *File) same(st *unix.Stat_t) bool {
	var own unix.Stat_t
	if unix.Fstat(d.fd, &own) != nil {
		return false
	}
	if d.block {
		return st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == own.Rdev
	}
	return st.Dev == own.Dev && st.Ino == own.Ino
}

// Flush waits until written data is durable (fdatasync).
func (d *File) Flush() error {
	if err := unix.Fdatasync(d.fd); err != nil {
		return fmt.Errorf("flush %s: %w", d.Name(), err)
	}
	return nil
}

// Discard punches a hole in a regular file or issues BLKDISCARD.
func (d *File) Discard(off, n int64) error {
	var err error
	if d.block {
		r := [2]uint64{uint64(off), uint64(n)}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, d.f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r))); e != 0 {
			err = e
		}
	} else {
		err = unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	if errors.Is(err, unix.EOPNOTSUPP) {
		return nil // discard is a hint
	}
	if err != nil {
		return fmt.Errorf("discard %s [%d+%d]: %w", d.Name(), off, n, err)
	}
	return nil
}

// WriteZeroes zeroes a range and keeps it allocated (a later write of it
// needs no new space): BLKZEROOUT on a block device; on a regular file
// FALLOC_FL_ZERO_RANGE, or where the file system lacks it (tmpfs) a hole
// punched and allocated again. Only where neither works are zeros written.
func (d *File) WriteZeroes(off, n int64) error {
	var err error
	if d.block {
		r := [2]uint64{uint64(off), uint64(n)}
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(d.fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); e != 0 {
			err = e
		}
	} else {
		err = unix.Fallocate(d.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if errors.Is(err, unix.EOPNOTSUPP) {
			err = d.punchAndAllocate(off, n)
		}
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		err = writeZeroBlocks(d, d.zeros(), off, n)
	}
	if err != nil {
		return fmt.Errorf("write zeroes %s [%d+%d]: %w", d.Name(), off, n, err)
	}
	return nil
}

// punchAndAllocate zeroes a range of a regular file by punching a hole and
// allocating the range again (without changing the size).
func (d *File) punchAndAllocate(off, n int64) error {
	if err := unix.Fallocate(d.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return err
	}
	if err := unix.Fallocate(d.fd, unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("allocate the zeroed range again: %w", err)
	}
	return nil
}

// Grow allocates a regular file up to size bytes with fallocate. A block
// device cannot grow.
func (d *File) Grow(size int64) error {
	if d.block || d.mapped != nil {
		return fmt.Errorf("grow %s: a block device or a mapped file cannot grow: %w", d.Name(), unix.EINVAL)
	}
	d.growMu.Lock()
	defer d.growMu.Unlock()
	if size <= d.size.Load() {
		return nil
	}
	if err := unix.Fallocate(d.fd, 0, 0, size); err != nil {
		return fmt.Errorf("grow %s to %d bytes: %w", d.Name(), size, err)
	}
	d.size.Store(size)
	return nil
}

// Close unmaps and closes the file; an O_TMPFILE file disappears.
func (d *File) Close() error {
	var err error
	if d.mapped != nil {
		err = unix.Munmap(d.mapped)
		d.mapped = nil
	}
	if d.df != nil {
		err = errors.Join(err, d.df.Close())
	}
	if d.tempDir != nil {
		err = errors.Join(err, d.tempDir.Close())
	}
	return errors.Join(err, d.f.Close())
}
