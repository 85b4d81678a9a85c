// Package cbt is change block tracking: blksnap's cbt_map. A Map divides
// a device into tracking blocks and keeps, for each block, one byte: the
// number of the snapshot interval in which the block was last written.
//
// # Model
//
// Interval numbers count takes: writes before the first take carry 1 (the
// active number of a fresh map), writes between take k and take k+1 carry
// k+1. Two maps are kept. The write map is marked by every data-changing
// request to the device (Mark). The read map is what an agent reads: at a
// take (Switch) it becomes a copy of the write map and the previous number
// becomes the map's "changes number" k. A backup made from snapshot k
// records (generation, k); the next backup, from snapshot k' > k of the
// same generation, copies exactly the blocks whose read map byte is
// greater than k.
//
// A generation is a random UUID. A new one, with both maps cleared, starts
// when the number would pass 255, when the device's size changes, and when
// the map was marked out of range; an agent that sees a new generation
// makes a full backup. Unlike blksnap, the read map is refreshed on that
// wrap too, so that it never shows numbers of an older generation.
//
// Writes to a snapshot image and explicit dirty ranges mark both maps
// (MarkBoth): the read map with the previous number, so that the current
// backup copies the block, and the write map with the active one, so that
// the next backup copies it again.
//
// # Locks
//
// Mark takes no lock: the write map's bytes are raised atomically (packed
// four to an atomic word) to the active number, itself an atomic read, and
// a mark out of range sets an atomic flag; for a 4 KiB write that is one
// compare-and-swap, or a load when the block is already marked. Map.mu
// guards everything else but the immutable block geometry, and serialises
// the writers of the active number and of the read map. A Switch must not
// run while Marks do (the daemon switches only while the device's changes
// are paused), or a change may count in either interval.
//
// # Persistence
//
// MarshalBinary and UnmarshalBinary save a map and load it (with a
// checksum), so that a daemon restart or a detach and attach of the same
// backing keeps the history; the caller decides when a saved map is still
// true to the device.
package cbt

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/google/uuid"
)

// Params size the tracking blocks, as blksnap's parameters of the same
// names.
type Params struct {
	MinShift uint  // tracking_block_minimum_shift: log2 of the smallest block
	MaxShift uint  // tracking_block_maximum_shift: log2 of the largest block
	MaxCount int64 // tracking_block_maximum_count: the count above which blocks grow
}

// BlockShift returns log2 of the tracking block size for a device of
// capacity bytes: the smallest block from MinShift up to MaxShift that
// keeps the count at or below MaxCount (blksnap's
// cbt_map_calculate_block_size).
func (p Params) BlockShift(capacity int64) uint {
	shift := p.MinShift
	for blocks(capacity, shift) > p.MaxCount && shift < p.MaxShift {
		shift++
	}
	return shift
}

func blocks(capacity int64, shift uint) int64 {
	return (capacity + 1<<shift - 1) >> shift
}

// ErrRange reports a range outside the device.
var ErrRange = errors.New("range outside the device")

// Info describes a map the way an agent needs it.
type Info struct {
	BlockSize  int64     // bytes per tracking block
	BlockCount int64     // blocks; the last one may be partial
	Capacity   int64     // device size in bytes
	Generation uuid.UUID // changes when the history is lost
	Changes    uint8     // the number of the last take: the read map's newest interval
}

// Map is the change tracking map of one device.
type Map struct {
	shift    uint  // log2 of the block size; immutable
	capacity int64 // device size in bytes; immutable

	// write is the interval of each block's last write, raised without
	// a lock; active is the interval being written, read without a lock
	// and stored under mu; corrupted is set when a mark fell outside the
	// map, and cleared under mu.
	write     atomicBytes
	active    atomic.Uint32
	corrupted atomic.Bool

	mu         sync.Mutex
	read       []byte    // the write map at the last take, plus dirty marks; guarded by mu
	previous   uint8     // the interval of the last take (changes number); guarded by mu
	generation uuid.UUID // guarded by mu
}

// New returns a fresh map of a device of capacity bytes: a new
// generation, nothing written.
func New(capacity int64, p Params) *Map {
	shift := p.BlockShift(capacity)
	n := blocks(capacity, shift)
	m := &Map{shift: shift, capacity: capacity, write: newAtomicBytes(n), read: make([]byte, n)}
	m.resetLocked()
	return m
}

// resetLocked starts a new generation with cleared maps.
func (m *Map) resetLocked() {
	m.write.set(make([]byte, m.write.n))
	clear(m.read)
	m.active.Store(1)
	m.previous = 0
	m.generation = uuid.New()
	m.corrupted.Store(false)
}

// Info returns the map's geometry, generation and changes number.
func (m *Map) Info() Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.infoLocked()
}

func (m *Map) infoLocked() Info {
	return Info{BlockSize: 1 << m.shift, BlockCount: m.write.n, Capacity: m.capacity,
		Generation: m.generation, Changes: m.previous}
}

// Mark records a change of length bytes at off in the write map. A range
// past the end marks the map corrupted: its next Switch starts a new
// generation.
func (m *Map) Mark(off, length int64) {
	_ = m.mark(off, length, false)
}

// MarkBoth records a change of length bytes at off in both maps: the
// current backup and the next one copy it.
func (m *Map) MarkBoth(off, length int64) error {
	return m.mark(off, length, true)
}

func (m *Map) mark(off, length int64, both bool) error {
	if length <= 0 {
		return nil
	}
	first, last, ok := m.span(off, length)
	if !ok {
		m.corrupted.Store(true)
		return fmt.Errorf("%w: %d bytes at %d, device of %d bytes", ErrRange, length, off, m.capacity)
	}
	if both {
		m.mu.Lock()
		defer m.mu.Unlock()
		for i := first; i <= last; i++ {
			m.read[i] = max(m.read[i], m.previous)
		}
	}
	active := byte(m.active.Load())
	for i := first; i <= last; i++ {
		m.write.raise(i, active)
	}
	return nil
}

// span returns the blocks of a byte range, or false if it leaves the device.
func (m *Map) span(off, length int64) (first, last int64, ok bool) {
	if off < 0 || off >= m.capacity || length > m.capacity-off {
		return 0, 0, false
	}
	return off >> m.shift, (off + length - 1) >> m.shift, true
}

// Switch is the take: the read map becomes the write map and a new
// interval begins. It starts a new generation first when the interval
// number would pass 255 or the map was corrupted. It returns the map's
// state after the switch.
func (m *Map) Switch() Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.active.Load() == 255 || m.corrupted.Load() {
		m.resetLocked()
	}
	m.previous = byte(m.active.Load())
	m.active.Add(1)
	m.write.copyTo(m.read)
	return m.infoLocked()
}

// ReadMap returns a copy of the read map, one byte per block, and the
// state it belongs to.
func (m *Map) ReadMap() ([]byte, Info) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.read...), m.infoLocked()
}
