package cow

import (
	"fmt"
	"sync/atomic"

	"github.com/ublksnap/ublksnap/storage"
)

// ChunkState is the state of a Chunk. The life cycle is
//
//	New ──load──▶ InMemory ──store──▶ Stored
//	 │               │                  │
//	 └───────────────┴──── failure ─────┴──▶ Failed
//
// A chunk never returns to New, so a reader that sees a state past New may
// rely on the original device no longer holding the snapshot's data.
type ChunkState uint32

const (
	// ChunkNew: the chunk was not copied; the snapshot's data is on the
	// original device.
	ChunkNew ChunkState = iota
	// ChunkInMemory: the snapshot's data is in the chunk's DiffBuffer and
	// the chunk waits in the store queue.
	ChunkInMemory
	// ChunkStored: the snapshot's data is in the chunk's region of the
	// difference storage; the buffer was released.
	ChunkStored
	// ChunkFailed: the data was lost; the difference area is corrupted.
	ChunkFailed
)

func (s ChunkState) String() string {
	switch s {
	case ChunkNew:
		return "new"
	case ChunkInMemory:
		return "in-memory"
	case ChunkStored:
		return "stored"
	case ChunkFailed:
		return "failed"
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// Chunk is the minimum unit of the original device whose old data is copied
// (blksnap's struct chunk). A chunk is allocated when it is first written
// on either side of the snapshot, so the chunk map stays sparse.
//
// lock is a binary semaphore held by whoever works on the chunk's data: a
// writer while it loads the chunk from the original, the store worker while
// it writes the buffer to the difference storage, an image request while it
// copies to or from the chunk. It is taken in one goroutine and may be
// released in another.
type Chunk struct {
	number      uint64    // index of the chunk on the device; immutable
	sectorCount int64     // sectors in the chunk (shorter for the last); immutable
	lock        semaphore // guards buf and region and every change of state

	// state is a ChunkState. It changes only with lock held, and is read
	// without lock where a stale "New" is harmless (see DiffArea.cowNoWait
	// and DiffArea.readImage).
	state atomic.Uint32
	// buf holds the snapshot's data while InMemory; guarded by lock.
	buf *DiffBuffer
	// region is where the data is stored (none while it has no Dev),
	// allocated on the first store and kept for later stores; guarded by
	// lock.
	region storage.DiffRegion
	// queued is set while the chunk is in the store queue; guarded by
	// DiffArea.storeMu.
	queued bool
}

// chunkSlabSize is how many chunks a chunkSlab holds.
const chunkSlabSize = 32

// chunkSlab is a block of chunks a difference area hands out one by one,
// in the order they are first touched, so that touching a chunk allocates
// one slab per chunkSlabSize chunks rather than a chunk each time.
type chunkSlab struct {
	chunks [chunkSlabSize]Chunk
	next   atomic.Int32 // the first chunk not handed out
}

// State returns the chunk's state.
func (c *Chunk) State() ChunkState { return ChunkState(c.state.Load()) }

// bytes returns the chunk's length in bytes.
func (c *Chunk) bytes() int64 { return c.sectorCount << storage.SectorShift }

// setState moves the chunk from one state to another; c.lock must be held.
// Under the invariants build tag, a transition from an unexpected state
// panics.
func (c *Chunk) setState(from, to ChunkState) {
	if invariantsEnabled && c.State() != from {
		panic(fmt.Sprintf("cow: invariant violated: chunk #%d is %v, expected %v before moving to %v", c.number, c.State(), from, to))
	}
	c.state.Store(uint32(to))
}
