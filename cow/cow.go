package cow

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/ublksnap/ublksnap/storage"
)

// cow performs the copy-on-write for a write, discard or write-zeroes of n
// bytes at off on the original (blksnap's diff_area_cow): every New chunk
// the range touches is locked, loaded from the original into a buffer,
// marked InMemory, queued for storing and released. When cow returns nil the
// original request may proceed: no chunk it touches is New any more (or the
// area is corrupted or closing, and COW is off).
//
// A request spanning several chunks is handled as one: the caller issues
// it only after all its chunks are loaded. To stay deadlock-free with a
// bounded buffer pool, cow never waits (for a chunk's lock or for a buffer)
// while it holds buffers of chunks not loaded yet: it loads and queues
// those first. Chunk locks are taken in ascending order.
//
// cow fails only with ctx.Err(), when the caller gave up: the original
// request must then not be issued (the chunks it touches may still be New).
// Every other failure corrupts the area and lets the request proceed.
func (da *DiffArea) cow(ctx context.Context, off, n int64) error {
	if n == 0 {
		return nil
	}
	for {
		again, err := da.cowPass(ctx, off, n)
		if !again {
			return err
		}
		// The kernel refused a copy and the area copies through buffers
		// from now on: the chunks it left New are taken again.
	}
}

// cowBatch is what one pass of cow holds: locked New chunks not copied
// yet, loads with a buffer each and copies in the kernel without one.
// Batches are kept for reuse (DiffArea.batches), so that a pass allocates
// nothing.
type cowBatch struct {
	loads  []*Chunk
	copies []*Chunk
}

// flush saves the chunks of the batch (see loadPending and copyPending)
// and empties it; again reports that the kernel refused a copy, leaving
// those chunks New.
func (da *DiffArea) flush(b *cowBatch) (again bool) {
	b.loads = da.loadPending(b.loads)
	again = da.copyPending(b.copies)
	b.reset()
	return again
}

// batchCacheSize is how many spare batches a batchCache keeps: more than
// a device has passes at once in the common case.
const batchCacheSize = 64

// batchCache keeps spare batches in slots taken and filled by atomic
// swaps: no lock, and, unlike a sync.Pool, nothing dropped behind the
// caller's back, so a pass allocates nothing once enough batches exist.
type batchCache [batchCacheSize]atomic.Pointer[cowBatch]

// get returns a spare batch, or a new one if there is none.
func (bc *batchCache) get() *cowBatch {
	for i := range bc {
		if b := bc[i].Swap(nil); b != nil {
			return b
		}
	}
	return new(cowBatch)
}

// put keeps an empty batch for later, if a slot is free.
func (bc *batchCache) put(b *cowBatch) {
	for i := range bc {
		if bc[i].CompareAndSwap(nil, b) {
			return
		}
	}
}

// reset empties the batch, keeping its arrays for the next pass.
func (b *cowBatch) reset() {
	clear(b.loads)
	clear(b.copies)
	b.loads, b.copies = b.loads[:0], b.copies[:0]
}

// cowPass is one pass of cow over the range; again reports that the
// kernel refused a copy and the range must be gone over once more.
func (da *DiffArea) cowPass(ctx context.Context, off, n int64) (again bool, err error) {
	first, last := da.chunkSpan(off, n)
	b := da.batches.get()
	defer func() {
		if len(b.loads)+len(b.copies) == 0 { // not after a panic midway
			da.batches.put(b)
		}
	}()
	for nr := first; nr <= last; nr++ {
		if da.corrupted.Load() {
			da.abandon(b.loads)
			da.abandon(b.copies)
			b.reset()
			return false, nil
		}
		c := da.lookup(nr)
		if c != nil && c.State() != ChunkNew {
			continue // past New for good: nothing to copy
		}
		if c == nil {
			c = da.chunkGet(nr)
		}
		if !c.lock.tryAcquire() {
			if da.flush(b) {
				return true, nil
			}
			if err := c.lock.acquire(ctx, da.stop); err != nil {
				return false, waitFailed(err)
			}
		}
		if c.State() != ChunkNew {
			c.lock.release()
			continue
		}
		if da.kernelCopy.Load() {
			b.copies = append(b.copies, c)
			continue
		}
		buf := da.buffers.tryTake()
		if buf == nil {
			if da.flush(b) {
				c.lock.release()
				return true, nil
			}
			var err error
			if buf, err = da.buffers.take(ctx, da.stop); err != nil {
				c.lock.release()
				return false, waitFailed(err)
			}
		}
		c.buf = buf
		b.loads = append(b.loads, c)
	}
	return da.flush(b), nil
}

// copyPending copies the pending chunks from the original into regions of
// the difference storage inside the kernel (storage.CopyRange), a run of
// neighbouring chunks whose regions are neighbours too in one call, marks
// them Stored and releases their locks; an allocation or copy failure
// corrupts the area and fails the chunks left. If the kernel cannot copy
// between these devices, kernel copies are turned off for the area and
// the chunks left are released still New (keeping any region they got),
// and copyPending reports it.
func (da *DiffArea) copyPending(pending []*Chunk) (refused bool) {
	for i := 0; i < len(pending); {
		if da.corrupted.Load() {
			da.abandon(pending[i:])
			return false
		}
		if err := da.allocRegion(pending[i]); err != nil {
			da.setCorrupted(err)
			da.abandon(pending[i:])
			return false
		}
		run := pending[i].region
		bytes := pending[i].bytes()
		j := i + 1
		for ; j < len(pending) && pending[j].number == pending[j-1].number+1; j++ {
			c := pending[j]
			if da.allocRegion(c) != nil || c.region.Dev != run.Dev || c.region.Sector != run.Sector+run.Count {
				break // a failure is met again as the start of the next run
			}
			run.Count += c.region.Count
			bytes += c.bytes()
		}
		err := storage.CopyRange(run.Dev, run.Sector<<storage.SectorShift, da.orig, int64(pending[i].number)<<da.chunkShift, bytes)
		switch {
		case errors.Is(err, storage.ErrNoKernelCopy):
			if da.kernelCopy.Swap(false) {
				da.log.Info("no in-kernel copy from the original to the difference storage: chunks are copied through buffers", "storage", run.Dev.Name())
			}
			for _, c := range pending[i:] {
				c.lock.release()
			}
			return true
		case err != nil:
			da.setCorrupted(fmt.Errorf("copy chunks #%d-#%d of %s: %w", pending[i].number, pending[j-1].number, da.name, err))
			da.abandon(pending[i:])
			return false
		}
		for _, c := range pending[i:j] {
			da.setChunkState(c, ChunkNew, ChunkStored)
			c.lock.release()
		}
		da.kernelCopied.Add(int64(j - i))
		i = j
	}
	return false
}

// waitFailed maps the failure of a wait in cow: a closing area turns COW
// off (nil), a cancelled caller gets its context error.
func waitFailed(err error) error {
	if errors.Is(err, errClosing) {
		return nil
	}
	return err
}

// loadPending loads the pending chunks from the original, marks them
// InMemory, queues them and releases their locks; a load failure corrupts
// the area and fails the chunks left. It returns pending emptied, for
// reuse.
func (da *DiffArea) loadPending(pending []*Chunk) []*Chunk {
	for i, c := range pending {
		if err := da.loadChunk(c); err != nil {
			da.setCorrupted(err)
			da.abandon(pending[i:])
			break
		}
		da.setChunkState(c, ChunkNew, ChunkInMemory)
		da.scheduleStoring(c)
		c.lock.release()
	}
	clear(pending)
	return pending[:0]
}

// abandon fails locked chunks whose COW cannot complete because the area is
// corrupted, freeing their buffers and releasing their locks.
func (da *DiffArea) abandon(chunks []*Chunk) {
	for _, c := range chunks {
		da.failChunk(c)
	}
}

// cowNoWait is cow for a caller that must not block (blksnap's REQ_NOWAIT
// path). It answers ErrWouldBlock, without side effects, if any chunk of
// the range is New (it would need loading, or is being loaded); it reads
// the chunk states without their locks, because a chunk past New never
// returns to New, so a chunk in any other state needs no COW whoever
// holds its lock.
func (da *DiffArea) cowNoWait(off, n int64) error {
	if n == 0 || da.corrupted.Load() {
		return nil
	}
	first, last := da.chunkSpan(off, n)
	for nr := first; nr <= last; nr++ {
		c := da.lookup(nr)
		if c == nil || c.State() == ChunkNew {
			if da.corrupted.Load() {
				return nil
			}
			return ErrWouldBlock
		}
	}
	return nil
}
