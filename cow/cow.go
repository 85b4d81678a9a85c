package cow

import (
	"context"
	"errors"
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
	first, last := da.chunkSpan(off, n)
	var pending []*Chunk // locked New chunks with a buffer, not loaded yet
	for nr := first; nr <= last; nr++ {
		if da.corrupted.Load() {
			da.abandon(pending)
			return nil
		}
		c := da.lookup(nr)
		if c != nil && c.State() != ChunkNew {
			continue // past New for good: nothing to copy
		}
		if c == nil {
			c = da.chunkGet(nr)
		}
		if !c.lock.tryAcquire() {
			pending = da.loadPending(pending)
			if err := c.lock.acquire(ctx, da.stop); err != nil {
				return waitFailed(err)
			}
		}
		if c.State() != ChunkNew {
			c.lock.release()
			continue
		}
		buf := da.buffers.tryTake()
		if buf == nil {
			pending = da.loadPending(pending)
			var err error
			if buf, err = da.buffers.take(ctx, da.stop); err != nil {
				c.lock.release()
				return waitFailed(err)
			}
		}
		c.buf = buf
		pending = append(pending, c)
	}
	da.loadPending(pending)
	return nil
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
