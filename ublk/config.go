package ublk

import (
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"runtime"
)

// Limits enforced by Config.Validate.
const (
	MaxQueues    = 64       // more queues than this is not useful for one device
	MaxDepth     = 4096     // UBLK_MAX_QUEUE_DEPTH
	MaxIOSizeMax = 32 << 20 // largest per-request buffer (UBLK_IO_BUF_BITS = 25)
	pageSize     = 4096     // ublk requires logical block size <= PAGE_SIZE
)

// Config describes a ublk device. Start from DefaultConfig; Validate rejects
// zero or out-of-range values, so every field must be set.
type Config struct {
	// Size is the device size in bytes, a multiple of LogicalBlockSize.
	Size int64
	// LogicalBlockSize is the smallest addressable unit: a power of two in
	// [512, 4096].
	LogicalBlockSize int
	// PhysicalBlockSize is a power of two >= LogicalBlockSize, <= 64 KiB.
	PhysicalBlockSize int
	// Queues is the number of hardware queues, each served by its own
	// OS thread: 1..MaxQueues. The kernel may lower it to the CPU count.
	Queues int
	// Depth is the number of requests in flight per queue: 1..MaxDepth.
	Depth int
	// MaxIOSize is the largest request in bytes: a multiple of 4096 in
	// [4096, MaxIOSizeMax]. Each queue reserves Depth × MaxIOSize bytes of
	// address space for buffers (touched on use only).
	MaxIOSize int
	// PinQueues pins each queue thread to the CPUs that blk-mq maps to its
	// queue (GET_QUEUE_AFFINITY), as ublksrv does: requests are then served
	// on the CPU that submitted them, without cross-CPU wakeups. It pays
	// off with many CPUs and submitters; with few CPUs it serializes the
	// submitter and the queue thread (on 2 vCPUs it cost 4x in 4 KiB IOPS).
	PinQueues bool
	// ReadOnly makes the block device read-only.
	ReadOnly bool
	// Rotational marks the device as a rotating disk.
	Rotational bool
	// VolatileCache announces a write-back cache: the kernel then sends
	// OpFlush requests.
	VolatileCache bool
	// FUA announces forced-unit-access support (requires VolatileCache):
	// writes may carry FlagFUA.
	FUA bool
	// Discard enables OpDiscard requests.
	Discard bool
	// WriteZeroes enables OpWriteZeroes requests.
	WriteZeroes bool
	// Recoverable creates the device with UBLK_F_USER_RECOVERY and
	// UBLK_F_USER_RECOVERY_REISSUE: when the serving process dies the
	// kernel keeps /dev/ublkbN and holds its requests (those the dead
	// server had taken are sent again) until Recover attaches a new
	// server. The handler must tolerate a request served twice.
	Recoverable bool
	// NoPartitionScan starts the device without the kernel's partition
	// scan. The scan reads the device from inside START_DEV, before the
	// device is live; on Linux 6.12 a server killed at that moment can
	// neither exit nor be replaced, because nothing fails that read. With
	// UBLK_F_NO_AUTO_PART_SCAN (7.0) the kernel is asked to skip the scan;
	// on older kernels the queue threads send their first FETCHes without
	// CAP_SYS_ADMIN in their effective set, which makes the kernel treat
	// the server as untrusted and suppress partition scans for good
	// (partitions can still be mapped with kpartx or losetup --partscan).
	NoPartitionScan bool
	// IOMode says how request data moves between the kernel and the
	// backing files; the zero value is IOModeCopy, which every kernel has
	// and which gives handlers Request.Buf.
	IOMode IOMode
	// WriteData says the handler needs a WRITE's data in Request.Buf in
	// every mode (it fills READs by backing I/O and Request.CopyIn). Zero
	// copy then needs UBLK_F_USER_COPY as well, through which the queue
	// copies a WRITE's data into a buffer of the pool (see IOModeUserCopy)
	// and CopyIn writes into a READ's pages.
	WriteData bool
	// BufferMemory bounds the bytes of request buffers per queue in user
	// copy mode; 0 means DefaultBufferMemory. A request that finds the
	// pool spent waits for another to finish.
	BufferMemory int
	// InlineMax gives READs and WRITEs of up to this many bytes their data
	// in Request.Buf in every mode, so that the handler can serve them
	// itself on the queue goroutine (a backing in memory, which io_uring
	// reaches only through a worker thread: for small requests the hop
	// costs more than the copy). Zero copy then needs UBLK_F_USER_COPY as
	// well, through which the queue copies their data; 0: none.
	InlineMax int
	// Files are descriptors registered on every queue ring, named in
	// backing I/O by RegisteredFile(index). They must stay open while the
	// device is served.
	Files []int
	// Owner is stored in the kernel's record of the device
	// (ublksrv_flags) and returned by Scan, so that a later process can
	// tell its own devices from others'.
	Owner uint64
	// Logger receives the device's diagnostics; nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConfig returns a complete Config for a device of size bytes:
// 512-byte logical and 4 KiB physical blocks, min(NumCPU, 4) queues of depth
// 128, 1 MiB requests, a volatile cache with FUA, no discard, queues not
// pinned.
func DefaultConfig(size int64) Config {
	return Config{
		Size:              size,
		LogicalBlockSize:  512,
		PhysicalBlockSize: 4096,
		Queues:            min(runtime.NumCPU(), 4),
		Depth:             128,
		MaxIOSize:         1 << 20,
		VolatileCache:     true,
		FUA:               true,
	}
}

// IOMode is how the data of READ and WRITE requests travels.
type IOMode uint8

const (
	// IOModeCopy: the kernel copies each request's data to or from a
	// buffer per tag in this process (Request.Buf), which backing I/O reads
	// into or writes from: two copies per request, depth × MaxIOSize bytes
	// of buffers per queue, resident once blk-mq has rotated through the
	// tags.
	IOModeCopy IOMode = iota
	// IOModeAuto: the best mode the kernel has for the handler: zero copy
	// (UBLK_F_AUTO_BUF_REG, Linux 6.16+; with Config.WriteData or
	// InlineMax also UBLK_F_USER_COPY), else user copy (UBLK_F_USER_COPY,
	// 6.5+), else copy.
	IOModeAuto
	// IOModeZeroCopy: the kernel registers each request's own pages in the
	// queue ring's buffer table and the backing I/O reads or writes them
	// there (READ_FIXED/WRITE_FIXED): the data never enters this process,
	// and Request.Buf is nil. A kernel without AUTO_BUF_REG fails New with
	// ErrNotSupported.
	IOModeZeroCopy
	// IOModeUserCopy: the queue copies each request's data between the
	// kernel and a buffer of a bounded per-queue pool (Config.BufferMemory)
	// with pread/pwrite on /dev/ublkcN, so buffers exist only while their
	// request is in flight. Request.Buf is that buffer. A kernel without
	// USER_COPY fails New with ErrNotSupported.
	IOModeUserCopy
)

// ioModes are the modes in the order of their numbers.
var ioModes = [...]IOMode{IOModeCopy, IOModeAuto, IOModeZeroCopy, IOModeUserCopy}

func (m IOMode) String() string {
	switch m {
	case IOModeCopy:
		return "copy"
	case IOModeAuto:
		return "auto"
	case IOModeZeroCopy:
		return "zero-copy"
	case IOModeUserCopy:
		return "user-copy"
	}
	return fmt.Sprintf("io-mode(%d)", uint8(m))
}

// ParseIOMode parses "copy", "auto", "zero-copy" or "user-copy".
func ParseIOMode(s string) (IOMode, error) {
	for _, m := range ioModes {
		if s == m.String() {
			return m, nil
		}
	}
	return 0, fmt.Errorf("%w: I/O mode %q: want copy, auto, zero-copy or user-copy", ErrInvalidConfig, s)
}

// pick returns the mode a device in mode m runs in on a kernel with
// features feats, and the ADD_DEV flag it needs (0 for copy mode).
// buffers (Config.WriteData or InlineMax) makes zero copy need user copy
// too.
func (m IOMode) pick(feats uint64, buffers bool) (IOMode, uint64, error) {
	zeroCopy := uint64(featAutoBufReg)
	if buffers {
		zeroCopy |= featUserCopy
	}
	switch {
	case m == IOModeZeroCopy && feats&zeroCopy != zeroCopy:
		return m, 0, fmt.Errorf("%w: zero copy needs UBLK_F_AUTO_BUF_REG (Linux 6.16+), here with USER_COPY; this kernel offers features %#x", ErrNotSupported, feats)
	case m == IOModeUserCopy && feats&featUserCopy == 0:
		return m, 0, fmt.Errorf("%w: user copy needs UBLK_F_USER_COPY (Linux 6.5+); this kernel offers features %#x", ErrNotSupported, feats)
	case m == IOModeZeroCopy, m == IOModeAuto && feats&zeroCopy == zeroCopy:
		return IOModeZeroCopy, zeroCopy, nil
	case m == IOModeUserCopy, m == IOModeAuto && feats&featUserCopy != 0:
		return IOModeUserCopy, featUserCopy, nil
	}
	return IOModeCopy, 0, nil
}

// modeOf is the mode of a device with the negotiated flags flags.
func modeOf(flags uint64) IOMode {
	switch {
	case flags&featAutoBufReg != 0:
		return IOModeZeroCopy
	case flags&featUserCopy != 0:
		return IOModeUserCopy
	}
	return IOModeCopy
}

// DefaultBufferMemory is the default Config.BufferMemory.
const DefaultBufferMemory = 8 << 20

func isPow2(n int) bool { return n > 0 && n&(n-1) == 0 }

// Validate reports every problem of c at once, each error wrapping
// ErrInvalidConfig. It makes no kernel call.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...))
	}
	lbs := c.LogicalBlockSize
	switch {
	case !isPow2(lbs) || lbs < 512 || lbs > pageSize:
		bad("logical block size %d: must be a power of two in [512, %d]", lbs, pageSize)
		lbs = 0
	}
	switch {
	case !isPow2(c.PhysicalBlockSize) || c.PhysicalBlockSize > 64<<10:
		bad("physical block size %d: must be a power of two <= 65536", c.PhysicalBlockSize)
	case lbs != 0 && c.PhysicalBlockSize < lbs:
		bad("physical block size %d is smaller than the logical block size %d", c.PhysicalBlockSize, lbs)
	}
	switch {
	case c.Size <= 0:
		bad("size %d: must be positive", c.Size)
	case lbs != 0 && c.Size%int64(lbs) != 0:
		bad("size %d is not a multiple of the logical block size %d", c.Size, lbs)
	case c.Size>>sectorShift > 1<<62:
		bad("size %d is too large", c.Size)
	}
	if c.Queues < 1 || c.Queues > MaxQueues {
		bad("queues %d: must be in [1, %d]", c.Queues, MaxQueues)
	}
	if c.Depth < 1 || c.Depth > MaxDepth {
		bad("queue depth %d: must be in [1, %d]", c.Depth, MaxDepth)
	}
	if c.MaxIOSize < pageSize || c.MaxIOSize > MaxIOSizeMax || c.MaxIOSize%pageSize != 0 {
		bad("max I/O size %d: must be a multiple of %d in [%d, %d]", c.MaxIOSize, pageSize, pageSize, MaxIOSizeMax)
	}
	if int(c.IOMode) >= len(ioModes) {
		bad("I/O mode %d: want IOModeCopy, IOModeAuto, IOModeZeroCopy or IOModeUserCopy", c.IOMode)
	}
	if c.InlineMax < 0 || c.InlineMax > c.MaxIOSize {
		bad("inline max %d: must be in [0, max I/O size %d]", c.InlineMax, c.MaxIOSize)
	}
	if c.BufferMemory < 0 || c.BufferMemory > 0 && c.BufferMemory < c.MaxIOSize {
		bad("buffer memory %d: must be 0 (the default) or at least the max I/O size %d", c.BufferMemory, c.MaxIOSize)
	}
	for i, fd := range c.Files {
		if fd < 0 {
			bad("file %d: descriptor %d", i, fd)
		}
	}
	if c.FUA && !c.VolatileCache {
		bad("FUA needs VolatileCache (the kernel ignores FUA without a volatile cache)")
	}
	return errors.Join(errs...)
}

// kernelParams converts a valid Config into ublk_params.
func (c *Config) kernelParams() params {
	p := params{Len: uint32(len152), Types: paramTypeBasic}
	lshift := uint8(bits.TrailingZeros(uint(c.LogicalBlockSize)))
	pshift := uint8(bits.TrailingZeros(uint(c.PhysicalBlockSize)))
	p.Basic = paramBasic{
		LogicalBSShift:  lshift,
		PhysicalBSShift: pshift,
		IOOptShift:      pshift,
		IOMinShift:      lshift,
		MaxSectors:      uint32(c.MaxIOSize >> sectorShift),
		DevSectors:      uint64(c.Size >> sectorShift),
	}
	if c.ReadOnly {
		p.Basic.Attrs |= attrReadOnly
	}
	if c.Rotational {
		p.Basic.Attrs |= attrRotational
	}
	if c.VolatileCache {
		p.Basic.Attrs |= attrVolatileCache
	}
	if c.FUA {
		p.Basic.Attrs |= attrFUA
	}
	if c.Discard || c.WriteZeroes {
		p.Types |= paramTypeDiscard
		p.Discard = paramDiscard{
			DiscardGranularity: uint32(c.PhysicalBlockSize),
			MaxDiscardSegments: 1,
		}
		const maxSectors = 1 << 21 // 1 GiB per request
		if c.Discard {
			p.Discard.MaxDiscardSectors = maxSectors
		}
		if c.WriteZeroes {
			p.Discard.MaxWriteZeroesSectors = maxSectors
		}
	}
	return p
}

// len152 is the size of the newest ublk_params, always sent in full.
const len152 = 152
