package storage

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// DefaultMinimumSectors is blksnap's diff_storage_minimum: 1 GiB, the
// growth step of the difference storage; the low-water mark is half of it.
const DefaultMinimumSectors = 2097152

// pageSectors is the number of sectors in a 4 KiB page; the low-water mark
// is rounded down to it, as in blksnap.
const pageSectors = 8

// Sentinel errors of the difference storage.
var (
	// ErrNoSpace means no region could be had: the storage overflowed and
	// stays overflowed. It matches syscall.ENOSPC.
	ErrNoSpace = fmt.Errorf("storage: difference storage overflow: %w", syscall.ENOSPC)
	// ErrBlockSize means a storage device has a logical block larger than
	// the original device's. It matches syscall.ENOTBLK, as in blksnap.
	ErrBlockSize = fmt.Errorf("storage: logical block of the difference storage larger than the original's: %w", syscall.ENOTBLK)
	// ErrClosed is returned by a DiffStorage after Close.
	ErrClosed = errors.New("storage: difference storage closed")
)

// Range is a run of 512-byte sectors on a device (blksnap_sectors): the
// sector-run type of all of ublksnap, also on the daemon's wire, as
// {"start","count"}.
type Range struct {
	Start int64 `json:"start"` // first sector
	Count int64 `json:"count"` // number of sectors
}

// DiffRegion is where the data of one chunk lives in the difference storage
// (blksnap's struct diff_region), a value: the zero DiffRegion (no Dev) is
// no region.
type DiffRegion struct {
	Dev    Device // the backing device
	Sector int64  // first sector of the region on Dev
	Count  int64  // number of sectors in the region
}

// ReadAt reads len(p) bytes at byte offset off inside the region.
func (r *DiffRegion) ReadAt(p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > r.Count<<SectorShift {
		return fmt.Errorf("read diff region %s@%d+%d [%d+%d]: %w", r.Dev.Name(), r.Sector, r.Count, off, len(p), syscall.EINVAL)
	}
	if _, err := r.Dev.ReadAt(p, r.Sector<<SectorShift+off); err != nil {
		return fmt.Errorf("read diff region %s@%d: %w", r.Dev.Name(), r.Sector, err)
	}
	return nil
}

// ReadAtNoWait is ReadAt if that needs no waiting; ErrWouldBlock
// otherwise (see ReadNoWait).
func (r *DiffRegion) ReadAtNoWait(p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > r.Count<<SectorShift {
		return fmt.Errorf("read diff region %s@%d+%d [%d+%d]: %w", r.Dev.Name(), r.Sector, r.Count, off, len(p), syscall.EINVAL)
	}
	if err := ReadNoWait(r.Dev, p, r.Sector<<SectorShift+off); err != nil {
		return fmt.Errorf("read diff region %s@%d: %w", r.Dev.Name(), r.Sector, err)
	}
	return nil
}

// WriteAt writes p at byte offset off inside the region.
func (r *DiffRegion) WriteAt(p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > r.Count<<SectorShift {
		return fmt.Errorf("write diff region %s@%d+%d [%d+%d]: %w", r.Dev.Name(), r.Sector, r.Count, off, len(p), syscall.EINVAL)
	}
	if _, err := r.Dev.WriteAt(p, r.Sector<<SectorShift+off); err != nil {
		return fmt.Errorf("write diff region %s@%d: %w", r.Dev.Name(), r.Sector, err)
	}
	return nil
}

// storageBlock is a run of sectors reserved for difference data (blksnap's
// struct storage_block). Its fields are guarded by DiffStorage.mu.
type storageBlock struct {
	dev    Device // the backing device
	sector int64  // first sector of the block on dev
	count  int64  // sectors in the block; grows for a growable file
	used   int64  // sectors handed out (or given up) from the start
}

// growFile is the growable file of a DiffStorage (blksnap v6/v7). Its
// fields are guarded by DiffStorage.mu.
type growFile struct {
	dev       Device        // the file (or a fixed block device: no Grower)
	block     *storageBlock // the one block that covers the file
	limit     int64         // sectors the file may never exceed
	allocated int64         // sectors allocated with fallocate so far
	growing   bool          // a fallocate is running

	limitPosted bool // no_space was posted for reaching limit
}

// Options configure a DiffStorage.
type Options struct {
	// MinimumSectors is blksnap's diff_storage_minimum: the size asked for
	// by a low_free_space event and the growth step of a file; the
	// low-water mark is half of it. 0 means DefaultMinimumSectors.
	MinimumSectors int64
	// Logger receives the storage's messages; nil means slog.Default().
	Logger *slog.Logger
}

// DiffStorage is the difference storage of one snapshot (blksnap's struct
// diff_storage), shared by all its devices. See the package documentation
// for the model.
type DiffStorage struct {
	minimum  int64        // diff_storage_minimum in sectors; immutable
	lowWater int64        // free sectors at or below which space is low; immutable
	log      *slog.Logger // immutable
	events   *EventQueue  // the snapshot's event queue; immutable

	// appendMu serialises Append, so that a file appended by several
	// callers at once is opened once. It is taken before mu.
	appendMu sync.Mutex

	// mu guards everything below. It is never held during I/O.
	mu sync.Mutex
	// devs are the backing devices opened by or given to the storage; Close
	// closes them.
	devs []Device
	// emptyBlocks lists the blocks with room left in order of arrival;
	// filledBlocks the blocks used up. Alloc carves from emptyBlocks[0].
	emptyBlocks  []*storageBlock
	filledBlocks []*storageBlock
	// grow is the growable file, nil for storage made of ranges.
	grow *growFile
	// capacity is the space given (ranges appended, file allocated);
	// blockSectors the space allocatable (capacity plus planned growth);
	// filled the space handed out or given up; requested the space asked
	// for by events (ranges) or planned (file). All in sectors.
	capacity     int64
	blockSectors int64
	filled       int64
	requested    int64
	// lowSpace is set when free space dropped to the low-water mark and is
	// cleared when it rises above it again, so that each crossing is
	// reported once.
	lowSpace bool
	// overflow is set for good when an allocation found no space.
	overflow bool
	// closed is set by Close.
	closed bool

	growers sync.WaitGroup // running fallocate goroutines
}

// Stats is a snapshot of a DiffStorage's accounting, in sectors.
type Stats struct {
	Capacity  int64 // space given: ranges appended, file allocated
	Filled    int64 // space handed out to chunks or given up
	Requested int64 // space asked for by low_free_space events, or planned for the file
	Limit     int64 // the growable file's limit (0 for ranges)
	Overflow  bool  // an allocation failed for lack of space
}

// New returns a difference storage without space, to be filled with Append.
// Having no space, it posts a low_free_space event at once, as blksnap does
// at snapshot creation.
func New(opts Options) *DiffStorage {
	ds := newDiffStorage(opts)
	ds.mu.Lock()
	ds.checkLowSpaceLocked()
	ds.mu.Unlock()
	return ds
}

func newDiffStorage(opts Options) *DiffStorage {
	minimum := opts.MinimumSectors
	if minimum <= 0 {
		minimum = DefaultMinimumSectors
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &DiffStorage{
		minimum:  minimum,
		lowWater: (minimum >> 1) &^ (pageSectors - 1),
		log:      log.With("component", "diff-storage"),
		events:   NewEventQueue(),
	}
}

// NewFile returns a difference storage kept in one file or block device
// (blksnap v6/v7). path is a directory (an unnamed O_TMPFILE is created in
// it and vanishes on Close), a regular file, or a block device. A file is
// grown with fallocate in steps of the minimum and never beyond
// limitSectors; a file already larger than the limit is used as it is (the
// limit bounds growth). A block device cannot grow: its first
// min(capacity, limit) sectors are the storage, and low_free_space asks
// for more before they are used up, as for storage made of ranges.
func NewFile(path string, limitSectors int64, opts Options) (*DiffStorage, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("difference storage: %w", err)
	}
	var dev *File
	if st.IsDir() {
		dev, err = OpenTemp(path)
	} else {
		dev, err = Open(path)
	}
	if err != nil {
		return nil, fmt.Errorf("difference storage: %w", err)
	}
	ds, err := NewFileDevice(dev, limitSectors, opts)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return ds, nil
}

// growable reports whether dev can grow: a Grower that is neither a block
// device nor a mapped file.
func growable(dev Device) bool {
	if f, ok := dev.(*File); ok && (f.block || f.mapped != nil) {
		return false
	}
	_, ok := dev.(Grower)
	return ok
}

// NewFileDevice is NewFile for an open device, which the storage owns from
// then on (on error it is the caller's to close).
func NewFileDevice(dev Device, limitSectors int64, opts Options) (*DiffStorage, error) {
	if limitSectors <= 0 {
		return nil, fmt.Errorf("difference storage %s: limit of %d sectors: %w", dev.Name(), limitSectors, syscall.EINVAL)
	}
	ds := newDiffStorage(opts)
	capacity := dev.Geometry().Sectors()
	if !growable(dev) {
		usable := min(capacity, limitSectors)
		if usable <= 0 {
			return nil, fmt.Errorf("difference storage %s: the device is empty: %w", dev.Name(), syscall.ENOSPC)
		}
		ds.devs = append(ds.devs, dev)
		ds.emptyBlocks = append(ds.emptyBlocks, &storageBlock{dev: dev, count: usable})
		ds.capacity, ds.blockSectors = usable, usable
		ds.mu.Lock()
		ds.checkLowSpaceLocked()
		ds.mu.Unlock()
		return ds, nil
	}
	limitSectors = max(limitSectors, capacity)
	if capacity <= ds.lowWater && capacity < limitSectors {
		size := capacity + min(ds.minimum, limitSectors-capacity)
		if err := dev.(Grower).Grow(size << SectorShift); err != nil {
			return nil, fmt.Errorf("difference storage: %w", err)
		}
		capacity = size
	}
	b := &storageBlock{dev: dev, count: capacity}
	ds.devs = append(ds.devs, dev)
	ds.emptyBlocks = append(ds.emptyBlocks, b)
	ds.grow = &growFile{dev: dev, block: b, limit: limitSectors, allocated: capacity}
	ds.capacity, ds.blockSectors, ds.requested = capacity, capacity, capacity
	ds.mu.Lock()
	ds.checkLowSpaceLocked()
	ds.mu.Unlock()
	return ds, nil
}

// Events returns the snapshot's event queue.
func (ds *DiffStorage) Events() *EventQueue { return ds.events }

// MinimumSectors returns diff_storage_minimum.
func (ds *DiffStorage) MinimumSectors() int64 { return ds.minimum }

// Stats returns the current accounting.
func (ds *DiffStorage) Stats() Stats {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	s := Stats{Capacity: ds.capacity, Filled: ds.filled, Requested: ds.requested, Overflow: ds.overflow}
	if ds.grow != nil {
		s.Limit = ds.grow.limit
	}
	return s
}

// Append opens the file or block device at path (once: a later call for
// the same file, by any path, reuses it) and adds ranges of it as storage
// blocks; no ranges means all of it. It may be called at any time, also
// while chunks are being stored. Nothing changes when it fails.
func (ds *DiffStorage) Append(path string, ranges []Range) error {
	ds.appendMu.Lock()
	defer ds.appendMu.Unlock()
	ds.mu.Lock()
	if ds.closed {
		ds.mu.Unlock()
		return ErrClosed
	}
	ds.mu.Unlock()
	dev, err := ds.deviceOf(path)
	if err != nil {
		return fmt.Errorf("append to difference storage: %w", err)
	}
	if dev != nil {
		return ds.appendRanges(dev, wholeIfNone(dev, ranges))
	}
	d, err := Open(path)
	if err != nil {
		return fmt.Errorf("append to difference storage: %w", err)
	}
	if err := ds.appendRanges(d, wholeIfNone(d, ranges)); err != nil {
		d.Close()
		return err
	}
	return nil
}

// wholeIfNone returns ranges, or the whole of dev if there are none.
func wholeIfNone(dev Device, ranges []Range) []Range {
	if len(ranges) > 0 {
		return ranges
	}
	return []Range{{Start: 0, Count: dev.Geometry().Sectors()}}
}

// deviceOf returns the storage's open device that is the file or block
// device at path (any path to it), or nil.
func (ds *DiffStorage) deviceOf(path string) (Device, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	ds.mu.Lock()
	defer ds.mu.Unlock()
	for _, d := range ds.devs {
		if f, ok := d.(*File); ok && f.same(&st) {
			return d, nil
		}
	}
	return nil, nil
}

// AppendDevice adds ranges of an open device as storage blocks. The storage
// owns dev from then on and closes it on Close; if it fails, dev stays the
// caller's.
func (ds *DiffStorage) AppendDevice(dev Device, ranges []Range) error {
	return ds.appendRanges(dev, ranges)
}

// appendRanges validates all ranges (reporting every bad one) and adds
// them; a device not known yet is registered then.
// A range must lie inside the device, be aligned to its logical blocks and
// overlap no range of the same device already in the storage (nor another
// range of the request).
func (ds *DiffStorage) appendRanges(dev Device, ranges []Range) error {
	geo := dev.Geometry()
	align := int64(geo.LogicalBlockSize >> SectorShift)
	var errs []error
	var valid []int // indexes of the ranges inside the device and aligned
	for i, r := range ranges {
		switch {
		case r.Start < 0 || r.Count <= 0 || r.Start > geo.Sectors() || r.Count > geo.Sectors()-r.Start:
			errs = append(errs, fmt.Errorf("range %d (%d+%d) outside %s (%d sectors): %w", i, r.Start, r.Count, dev.Name(), geo.Sectors(), syscall.EINVAL))
			continue
		case r.Start%align != 0 || r.Count%align != 0:
			errs = append(errs, fmt.Errorf("range %d (%d+%d) not aligned to the %d-byte blocks of %s: %w", i, r.Start, r.Count, geo.LogicalBlockSize, dev.Name(), syscall.EINVAL))
			continue
		}
		for _, j := range valid {
			if o := ranges[j]; overlap(r.Start, r.Count, o.Start, o.Count) {
				errs = append(errs, fmt.Errorf("range %d (%d+%d) overlaps range %d (%d+%d): %w", i, r.Start, r.Count, j, o.Start, o.Count, syscall.EINVAL))
			}
		}
		valid = append(valid, i)
	}
	if len(errs) > 0 {
		return fmt.Errorf("append to difference storage: %w", errors.Join(errs...))
	}
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.closed {
		return ErrClosed
	}
	for i, r := range ranges {
		for _, b := range ds.blocksOfLocked(dev) {
			if overlap(r.Start, r.Count, b.sector, b.count) {
				errs = append(errs, fmt.Errorf("range %d (%d+%d) of %s overlaps sectors %d+%d already in the difference storage: %w", i, r.Start, r.Count, dev.Name(), b.sector, b.count, syscall.EINVAL))
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("append to difference storage: %w", errors.Join(errs...))
	}
	if !slices.Contains(ds.devs, dev) {
		ds.devs = append(ds.devs, dev)
	}
	for _, r := range ranges {
		ds.emptyBlocks = append(ds.emptyBlocks, &storageBlock{dev: dev, sector: r.Start, count: r.Count})
		ds.capacity += r.Count
		ds.blockSectors += r.Count
		ds.log.Debug("range added", "dev", dev.Name(), "sector", r.Start, "count", r.Count)
	}
	ds.rearmLowSpaceLocked()
	return nil
}

// blocksOfLocked returns the storage blocks on dev; ds.mu must be held.
func (ds *DiffStorage) blocksOfLocked(dev Device) []*storageBlock {
	var out []*storageBlock
	for _, list := range [][]*storageBlock{ds.emptyBlocks, ds.filledBlocks} {
		for _, b := range list {
			if b.dev == dev {
				out = append(out, b)
			}
		}
	}
	return out
}

// overlap reports whether the sector runs a+n and b+m share a sector.
func overlap(a, n, b, m int64) bool { return a < b+m && b < a+n }

// Alloc hands out a region of count sectors for a chunk of an original
// device whose logical block is logicalBlockSize bytes. It fails with
// ErrNoSpace (and sets the overflow flag) when no empty block has room, and
// with ErrBlockSize when the next block's device has larger logical blocks.
func (ds *DiffStorage) Alloc(count int64, logicalBlockSize int) (DiffRegion, error) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.closed {
		return DiffRegion{}, ErrClosed
	}
	if ds.overflow {
		return DiffRegion{}, ErrNoSpace
	}
	for {
		if len(ds.emptyBlocks) == 0 {
			ds.overflow = true
			ds.log.Error("difference storage overflow", "capacity", ds.capacity, "filled", ds.filled, "requested", count)
			return DiffRegion{}, ErrNoSpace
		}
		b := ds.emptyBlocks[0]
		if lbs := b.dev.Geometry().LogicalBlockSize; lbs > logicalBlockSize {
			return DiffRegion{}, fmt.Errorf("allocate on %s (%d-byte blocks) for a device with %d-byte blocks: %w", b.dev.Name(), lbs, logicalBlockSize, ErrBlockSize)
		}
		if avail := b.count - b.used; avail >= count {
			r := DiffRegion{Dev: b.dev, Sector: b.sector + b.used, Count: count}
			b.used += count
			ds.filled += count
			ds.checkLowSpaceLocked()
			return r, nil
		}
		// The tail is too small for a chunk: give it up (blocks are
		// expected to hold many chunks, so little is lost).
		ds.filled += b.count - b.used
		b.used = b.count
		ds.emptyBlocks[0] = nil
		ds.emptyBlocks = ds.emptyBlocks[1:]
		ds.filledBlocks = append(ds.filledBlocks, b)
	}
}

// free returns the sectors that can still be handed out; ds.mu must be held.
func (ds *DiffStorage) freeLocked() int64 { return ds.blockSectors - ds.filled }

// checkLowSpaceLocked reacts to the free space dropping to the low-water
// mark. A growable file below its limit plans its next growth step at once
// (so allocation never waits for fallocate) and says nothing. Otherwise the
// crossing is reported once with a low_free_space event asking for
// diff_storage_minimum more sectors (to be given with Append); a file that
// reached its limit also posts no_space, the first time. ds.mu must be held.
func (ds *DiffStorage) checkLowSpaceLocked() {
	if ds.lowSpace || ds.freeLocked() > ds.lowWater {
		return
	}
	g := ds.grow
	if g != nil && g.block.count < g.limit {
		ds.growLocked()
		if ds.freeLocked() > ds.lowWater {
			return
		}
	}
	ds.lowSpace = true
	if g != nil && g.block.count >= g.limit && !g.limitPosted {
		g.limitPosted = true
		ds.log.Warn("difference storage file reached its limit", "limit", g.limit)
		ds.events.Post(Event{Code: EventNoSpace, RequestedSectors: g.limit})
	}
	ds.requested += ds.minimum
	ds.log.Info("low free space", "free", ds.freeLocked(), "requested", ds.requested)
	ds.events.Post(Event{Code: EventLowFreeSpace, RequestedSectors: ds.minimum})
}

// rearmLowSpaceLocked clears the low-space flag once free space is above
// the low-water mark again, so that the next crossing is reported.
// ds.mu must be held.
func (ds *DiffStorage) rearmLowSpaceLocked() {
	if ds.lowSpace && ds.freeLocked() > ds.lowWater {
		ds.lowSpace = false
	}
}

// growLocked plans the next growth step of the file and starts fallocate
// in the background. As in blksnap v7 the new space can be handed out at
// once: a region is only written after it was handed out, and a write past
// the end of a file extends it. ds.mu must be held.
func (ds *DiffStorage) growLocked() {
	g := ds.grow
	step := min(ds.minimum, g.limit-g.block.count)
	g.block.count += step
	ds.blockSectors += step
	ds.requested += step
	if g.block.used == g.block.count-step {
		// The block had been moved to the filled list; it has room again.
		for i, b := range ds.filledBlocks {
			if b == g.block {
				ds.filledBlocks = append(ds.filledBlocks[:i], ds.filledBlocks[i+1:]...)
				ds.emptyBlocks = append(ds.emptyBlocks, b)
				break
			}
		}
	}
	if g.growing {
		return // the running grower picks up the new size
	}
	g.growing = true
	ds.growers.Add(1)
	go ds.grower()
}

// grower runs fallocate until the file has its planned size.
func (ds *DiffStorage) grower() {
	defer ds.growers.Done()
	ds.mu.Lock()
	defer ds.mu.Unlock()
	g := ds.grow
	for g.allocated < g.block.count && !ds.closed {
		size := g.block.count
		ds.mu.Unlock()
		err := g.dev.(Grower).Grow(size << SectorShift)
		ds.mu.Lock()
		if err != nil {
			// Regions already handed out beyond the allocated size may
			// fail to write, which corrupts the snapshot, not the
			// original. The next growth step tries again.
			ds.log.Error("cannot grow difference storage", "dev", g.dev.Name(), "sectors", size, "err", err)
			g.growing = false
			return
		}
		ds.capacity += size - g.allocated
		g.allocated = size
		ds.log.Debug("difference storage grown", "dev", g.dev.Name(), "sectors", size)
	}
	g.growing = false
}

// Close waits for a running fallocate and closes all backing devices; an
// unnamed file disappears. Regions handed out become unusable.
func (ds *DiffStorage) Close() error {
	ds.mu.Lock()
	if ds.closed {
		ds.mu.Unlock()
		return ErrClosed
	}
	ds.closed = true
	ds.mu.Unlock()
	ds.events.Close()
	ds.growers.Wait()
	ds.mu.Lock()
	defer ds.mu.Unlock()
	var errs []error
	for _, d := range ds.devs {
		if err := d.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	ds.devs, ds.emptyBlocks, ds.filledBlocks = nil, nil, nil
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close difference storage: %w", err)
	}
	return nil
}
