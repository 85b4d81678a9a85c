package cow

import (
	"errors"
	"fmt"
	"sort"

	"github.com/ublksnap/ublksnap/storage"
)

// Params are the tunables of the chunk engine, named and defaulted as
// blksnap's module parameters (section 2 of the reference). They are read
// when a DiffArea is created; later changes do not affect it.
type Params struct {
	// TrackingBlockMinimumShift is tracking_block_minimum_shift: log2 of
	// the smallest change-tracking block in bytes (16: 64 KiB).
	TrackingBlockMinimumShift uint
	// TrackingBlockMaximumShift is tracking_block_maximum_shift: log2 of
	// the largest change-tracking block in bytes (26: 64 MiB).
	TrackingBlockMaximumShift uint
	// TrackingBlockMaximumCount is tracking_block_maximum_count: the block
	// count above which the tracking block grows (2097152).
	TrackingBlockMaximumCount int64
	// ChunkMinimumShift is chunk_minimum_shift: log2 of the smallest chunk
	// in bytes (18: 256 KiB); at least 12 (a page).
	ChunkMinimumShift uint
	// ChunkMaximumCountShift is chunk_maximum_count_shift: log2 of the
	// chunk count above which the chunk grows (40).
	ChunkMaximumCountShift uint
	// ChunkMaximumShift is chunk_maximum_shift: log2 of the largest chunk
	// in bytes (26: 64 MiB); a device that needs larger chunks is refused.
	ChunkMaximumShift uint
	// ChunkMaximumInQueue is chunk_maximum_in_queue: loaded chunks may wait
	// in memory until more than this many are queued for storing (16).
	ChunkMaximumInQueue int
	// FreeDiffBufferPoolSize is free_diff_buffer_pool_size: free chunk
	// buffers kept for reuse per difference area (128), within
	// DiffBufferMemoryLimit and only while no writer waits for a buffer.
	FreeDiffBufferPoolSize int
	// DiffStorageMinimum is diff_storage_minimum in sectors: the size asked
	// for when space runs low and the growth step of a storage file
	// (2097152: 1 GiB). At least two minimum chunks, and a multiple of it.
	DiffStorageMinimum int64
	// DiffBufferMemoryLimit (ublksnap's own) bounds the bytes of chunk
	// buffers, in use and free (64 MiB; at least one buffer is always
	// allowed): of all the difference areas of a snapshot manager
	// together, which share one BufferBudget of this size, or of one area
	// created without a budget. Writers that need a buffer beyond it wait
	// for the store workers, so memory does not grow with the load or the
	// number of devices.
	DiffBufferMemoryLimit int64
	// ChunkCopyInKernel (ublksnap's own) is 1 to preserve a chunk with
	// an in-kernel copy (copy_file_range) from the original into the
	// difference storage where both are regular files (the default), so
	// that its data never enters this process and takes no chunk buffer;
	// 0 to read it into a buffer and store it from there, as blksnap
	// does. Either way the write waits until the old data is safe.
	ChunkCopyInKernel int
}

// DefaultParams returns blksnap's defaults.
func DefaultParams() Params {
	return Params{
		TrackingBlockMinimumShift: 16,
		TrackingBlockMaximumShift: 26,
		TrackingBlockMaximumCount: 2097152,
		ChunkMinimumShift:         18,
		ChunkMaximumCountShift:    40,
		ChunkMaximumShift:         26,
		ChunkMaximumInQueue:       16,
		FreeDiffBufferPoolSize:    128,
		DiffStorageMinimum:        storage.DefaultMinimumSectors,
		DiffBufferMemoryLimit:     64 << 20,
		ChunkCopyInKernel:         1,
	}
}

// ErrInvalidParams is wrapped by every Params.Validate and Params.Set error.
var ErrInvalidParams = errors.New("cow: invalid parameters")

// paramFields maps blksnap's parameter names to the fields of p.
func (p *Params) paramFields() map[string]any {
	return map[string]any{
		"tracking_block_minimum_shift": &p.TrackingBlockMinimumShift,
		"tracking_block_maximum_shift": &p.TrackingBlockMaximumShift,
		"tracking_block_maximum_count": &p.TrackingBlockMaximumCount,
		"chunk_minimum_shift":          &p.ChunkMinimumShift,
		"chunk_maximum_count_shift":    &p.ChunkMaximumCountShift,
		"chunk_maximum_shift":          &p.ChunkMaximumShift,
		"chunk_maximum_in_queue":       &p.ChunkMaximumInQueue,
		"free_diff_buffer_pool_size":   &p.FreeDiffBufferPoolSize,
		"diff_storage_minimum":         &p.DiffStorageMinimum,
		"diff_buffer_memory_limit":     &p.DiffBufferMemoryLimit,
		"chunk_copy_in_kernel":         &p.ChunkCopyInKernel,
	}
}

// Unit is what a parameter's value counts.
type Unit int

// Units of parameters.
const (
	UnitCount   Unit = iota // a plain number: a count or a shift
	UnitBytes               // bytes
	UnitSectors             // 512-byte sectors
)

// ParamUnit returns what the named parameter counts.
func ParamUnit(name string) Unit {
	switch name {
	case "diff_storage_minimum":
		return UnitSectors
	case "diff_buffer_memory_limit":
		return UnitBytes
	}
	return UnitCount
}

// Get returns the value of the parameter with blksnap's name, in its
// unit, and whether the name is known.
func (p *Params) Get(name string) (int64, bool) {
	switch f := p.paramFields()[name].(type) {
	case *uint:
		return int64(*f), true
	case *int:
		return int64(*f), true
	case *int64:
		return *f, true
	}
	return 0, false
}

// ParamNames returns the names Set accepts, sorted.
func ParamNames() []string {
	var p Params
	var names []string
	for n := range p.paramFields() {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Set sets the parameter with blksnap's name to value. It does not
// validate the whole set; call Validate afterwards.
func (p *Params) Set(name string, value int64) error {
	f, ok := p.paramFields()[name]
	if !ok {
		return fmt.Errorf("%w: unknown parameter %q", ErrInvalidParams, name)
	}
	if value < 0 {
		return fmt.Errorf("%w: %s = %d is negative", ErrInvalidParams, name, value)
	}
	switch f := f.(type) {
	case *uint:
		*f = uint(value)
	case *int:
		*f = int(value)
	case *int64:
		*f = value
	}
	return nil
}

// ParamError is one parameter whose value is out of bounds, alone or
// against another parameter.
type ParamError struct {
	Name   string // blksnap's name of the parameter at fault
	Reason string // its value in its unit and the bound it breaks
}

func (e *ParamError) Error() string { return e.Name + " " + e.Reason }

// Check returns every inconsistency, each naming the parameter at fault;
// none means the set is valid.
func (p Params) Check() []*ParamError {
	var errs []*ParamError
	bad := func(name, format string, args ...any) {
		errs = append(errs, &ParamError{Name: name, Reason: fmt.Sprintf(format, args...)})
	}
	if p.TrackingBlockMinimumShift < storage.SectorShift || p.TrackingBlockMinimumShift > 30 {
		bad("tracking_block_minimum_shift", "(%d) must be in [9, 30]", p.TrackingBlockMinimumShift)
	}
	if p.TrackingBlockMaximumShift < p.TrackingBlockMinimumShift || p.TrackingBlockMaximumShift > 30 {
		bad("tracking_block_maximum_shift", "(%d) must be in [tracking_block_minimum_shift (%d), 30]", p.TrackingBlockMaximumShift, p.TrackingBlockMinimumShift)
	}
	if p.TrackingBlockMaximumCount < 1 {
		bad("tracking_block_maximum_count", "(%d) must be >= 1", p.TrackingBlockMaximumCount)
	}
	if p.ChunkMinimumShift < 12 || p.ChunkMinimumShift > 30 {
		bad("chunk_minimum_shift", "(%d) must be in [12, 30]", p.ChunkMinimumShift)
	}
	if p.ChunkMaximumShift < p.ChunkMinimumShift || p.ChunkMaximumShift > 30 {
		bad("chunk_maximum_shift", "(%d) must be in [chunk_minimum_shift (%d), 30]", p.ChunkMaximumShift, p.ChunkMinimumShift)
	}
	if p.ChunkMaximumCountShift < 1 || p.ChunkMaximumCountShift > 40 {
		bad("chunk_maximum_count_shift", "(%d) must be in [1, 40]", p.ChunkMaximumCountShift)
	}
	if p.ChunkMaximumInQueue < 0 {
		bad("chunk_maximum_in_queue", "(%d) must be >= 0", p.ChunkMaximumInQueue)
	}
	if p.FreeDiffBufferPoolSize < 0 {
		bad("free_diff_buffer_pool_size", "(%d) must be >= 0", p.FreeDiffBufferPoolSize)
	}
	if p.ChunkMinimumShift >= 12 && p.ChunkMinimumShift <= 30 {
		minChunk := int64(1) << (p.ChunkMinimumShift - storage.SectorShift)
		if p.DiffStorageMinimum < 2*minChunk || p.DiffStorageMinimum%minChunk != 0 {
			bad("diff_storage_minimum", "(%d sectors) must be a multiple of the minimum chunk (%d sectors), at least two of them", p.DiffStorageMinimum, minChunk)
		}
	}
	if p.ChunkCopyInKernel > 1 {
		bad("chunk_copy_in_kernel", "(%d) must be 0 or 1", p.ChunkCopyInKernel)
	}
	if p.DiffBufferMemoryLimit < 1 {
		bad("diff_buffer_memory_limit", "(%d) must be >= 1", p.DiffBufferMemoryLimit)
	}
	return errs
}

// Validate reports every inconsistency at once, as Check finds them, in
// one error that wraps ErrInvalidParams and each ParamError.
func (p Params) Validate() error {
	probs := p.Check()
	if len(probs) == 0 {
		return nil
	}
	errs := make([]error, len(probs))
	for i, e := range probs {
		errs[i] = e
	}
	return fmt.Errorf("%w: %w", ErrInvalidParams, errors.Join(errs...))
}

// ChunkShift computes log2 of the chunk size in bytes for a device, as
// blksnap's diff_area_calculate_chunk_size: start at chunk_minimum_shift
// and double while the chunk count exceeds 2^chunk_maximum_count_shift or
// the chunk is smaller than the device's minimum I/O size; refuse the device
// if that exceeds chunk_maximum_shift.
func (p Params) ChunkShift(geo storage.Geometry) (uint, error) {
	shift := p.ChunkMinimumShift
	for {
		count := countByShift(geo.Size, shift)
		if count <= 1<<p.ChunkMaximumCountShift && 1<<shift >= int64(geo.MinIOSize) {
			break
		}
		shift++
		if shift > 62 {
			break
		}
	}
	if shift > p.ChunkMaximumShift {
		return 0, fmt.Errorf("chunk of 2^%d bytes needed for %d bytes with min I/O %d exceeds chunk_maximum_shift (%d): %w",
			shift, geo.Size, geo.MinIOSize, p.ChunkMaximumShift, ErrInvalidParams)
	}
	return shift, nil
}

// countByShift returns the number of 2^shift-byte chunks covering size bytes.
func countByShift(size int64, shift uint) int64 {
	return (size + 1<<shift - 1) >> shift
}
