package cow

import (
	"context"
	"errors"
	"fmt"

	"github.com/ublksnap/ublksnap/storage"
)

// zeros is the source of WriteZeroesImage; it is never written.
var zeros [64 << 10]byte

// ReadImage reads len(p) bytes at off of the snapshot image (blksnap's
// diff_area_submit_chunk for reads): a New chunk (or one never touched) is
// read from the original, an InMemory chunk from its buffer, a Stored chunk
// from the difference storage; a Failed chunk or a corrupted area fails
// with ErrCorrupted.
//
// Chunks not past New are read without their lock and checked again
// afterwards: if a writer copied the chunk meanwhile (it then may have
// changed the original), the read is redone from the copy. This keeps
// image reads from allocating chunks, so reading a whole image does not
// grow the chunk map.
//
// With nowait set, ReadImage answers ErrWouldBlock instead of waiting for a
// chunk's lock or for data that is not in memory (RWF_NOWAIT reads of the
// original and the difference storage); the caller then retries with
// nowait false (p may have been partly filled).
func (da *DiffArea) ReadImage(ctx context.Context, p []byte, off int64, nowait bool) error {
	if err := da.checkRange("read image", off, int64(len(p))); err != nil {
		return err
	}
	if !da.enter() {
		return ErrClosed
	}
	defer da.leave()
	return da.forEachChunk(off, int64(len(p)), func(nr uint64, coff, pos, l int64) error {
		return da.readImageChunk(ctx, nr, p[pos:pos+l], coff, nowait)
	})
}

// forEachChunk splits n bytes at off into per-chunk segments and calls fn
// with the chunk number, the offset inside the chunk, the offset inside the
// request and the length, in order, stopping at the first error.
func (da *DiffArea) forEachChunk(off, n int64, fn func(nr uint64, coff, pos, l int64) error) error {
	mask := int64(1)<<da.chunkShift - 1
	for pos := int64(0); pos < n; {
		at := off + pos
		coff := at & mask
		l := min(n-pos, mask+1-coff)
		if err := fn(uint64(at>>da.chunkShift), coff, pos, l); err != nil {
			return err
		}
		pos += l
	}
	return nil
}

// isNew reports whether chunk c (nil: never touched) holds no copy.
func isNew(c *Chunk) bool { return c == nil || c.State() == ChunkNew }

// readImageChunk reads one segment of chunk nr at coff into seg. With
// nowait it reads only what needs no waiting (memory, the page cache) and
// answers ErrWouldBlock otherwise.
func (da *DiffArea) readImageChunk(ctx context.Context, nr uint64, seg []byte, coff int64, nowait bool) error {
	if da.corrupted.Load() {
		return ErrCorrupted
	}
	at := int64(nr)<<da.chunkShift + coff
	c := da.lookup(nr)
	if isNew(c) {
		if err := da.readOriginal(seg, at, nowait); err != nil {
			return err
		}
		if c = da.lookup(nr); isNew(c) {
			return da.checkCorrupted()
		}
	}
	if err := da.lockChunk(ctx, c, nowait); err != nil {
		return err
	}
	defer c.lock.release()
	switch c.State() {
	case ChunkNew:
		// Locked and New: no writer can change the original here now.
		if err := da.readOriginal(seg, at, nowait); err != nil {
			return err
		}
	case ChunkInMemory:
		copy(seg, c.buf.data[coff:])
	case ChunkStored:
		var err error
		if nowait {
			err = c.region.ReadAtNoWait(seg, coff)
		} else {
			err = c.region.ReadAt(seg, coff)
		}
		if errors.Is(err, storage.ErrWouldBlock) {
			return ErrWouldBlock
		}
		if err != nil {
			da.setCorrupted(err)
			return fmt.Errorf("read image %s chunk #%d: %w: %w", da.name, nr, ErrCorrupted, err)
		}
	case ChunkFailed:
		return ErrCorrupted
	}
	return da.checkCorrupted()
}

// readOriginal reads seg at byte at of the original for the image.
func (da *DiffArea) readOriginal(seg []byte, at int64, nowait bool) error {
	var err error
	if nowait {
		err = storage.ReadNoWait(da.orig, seg, at)
		if errors.Is(err, storage.ErrWouldBlock) {
			return ErrWouldBlock
		}
	} else {
		_, err = da.orig.ReadAt(seg, at)
	}
	if err != nil {
		return fmt.Errorf("read image %s at %d from the original: %w", da.name, at, err)
	}
	return nil
}

// checkCorrupted returns ErrCorrupted once the area is corrupted: COW is
// off then, so data just read from the original may be newer than the
// snapshot.
func (da *DiffArea) checkCorrupted() error {
	if da.corrupted.Load() {
		return ErrCorrupted
	}
	return nil
}

// lockChunk takes c.lock, or answers ErrWouldBlock under nowait when it is
// busy; ErrClosed when the area closes meanwhile.
func (da *DiffArea) lockChunk(ctx context.Context, c *Chunk, nowait bool) error {
	if nowait {
		if !c.lock.tryAcquire() {
			return ErrWouldBlock
		}
		return nil
	}
	if err := c.lock.acquire(ctx, da.stop); err != nil {
		if errors.Is(err, errClosing) {
			return ErrClosed
		}
		return err
	}
	return nil
}

// WriteImage writes p at off of the snapshot image. Image writes never
// reach the original: a New chunk is loaded from the original first, then
// changed in memory and queued for storing (blksnap's "load and
// schedule"); an InMemory chunk is changed in memory; a Stored chunk is
// written in its region.
//
// With nowait set, WriteImage changes only chunks held in memory: it
// answers ErrWouldBlock if a chunk is not InMemory (it would need a load or
// a write to the difference storage) or is busy. It checks all chunks
// first, but a chunk may become busy after earlier segments were written;
// the retry without nowait writes the same data again.
func (da *DiffArea) WriteImage(ctx context.Context, p []byte, off int64, nowait bool) error {
	return da.writeImage(ctx, p, off, int64(len(p)), nowait)
}

// WriteZeroesImage makes n bytes at off of the image read back as zeros,
// like WriteImage with a buffer of zeros.
func (da *DiffArea) WriteZeroesImage(ctx context.Context, off, n int64, nowait bool) error {
	return da.writeImage(ctx, nil, off, n, nowait)
}

// DiscardImage accepts a discard of the image and keeps the data (a
// discard only allows the device to drop it); it fails like other image
// I/O once the area is corrupted.
func (da *DiffArea) DiscardImage(off, n int64) error {
	if err := da.checkRange("discard image", off, n); err != nil {
		return err
	}
	return da.checkCorrupted()
}

// writeImage writes n bytes at off of the image, taken from p or zeros if
// p is nil.
func (da *DiffArea) writeImage(ctx context.Context, p []byte, off, n int64, nowait bool) error {
	if err := da.checkRange("write image", off, n); err != nil {
		return err
	}
	if !da.enter() {
		return ErrClosed
	}
	defer da.leave()
	if err := da.checkCorrupted(); err != nil {
		return err
	}
	if nowait {
		// Fail before writing anything unless every chunk is in memory.
		first, last := da.chunkSpan(off, n)
		for nr := first; nr <= last; nr++ {
			if c := da.lookup(nr); c == nil || c.State() != ChunkInMemory {
				return ErrWouldBlock
			}
		}
	}
	return da.forEachChunk(off, n, func(nr uint64, coff, pos, l int64) error {
		var src []byte
		if p != nil {
			src = p[pos : pos+l]
		}
		return da.writeImageChunk(ctx, nr, src, coff, l, nowait)
	})
}

// writeImageChunk writes l bytes of src (zeros if nil) at coff of chunk nr.
func (da *DiffArea) writeImageChunk(ctx context.Context, nr uint64, src []byte, coff, l int64, nowait bool) error {
	var c *Chunk
	if nowait {
		if c = da.lookup(nr); c == nil {
			return ErrWouldBlock
		}
	} else {
		c = da.chunkGet(nr)
	}
	if err := da.lockChunk(ctx, c, nowait); err != nil {
		return err
	}
	if err := da.checkCorrupted(); err != nil {
		c.lock.release()
		return err
	}
	switch c.State() {
	case ChunkNew:
		if nowait {
			c.lock.release()
			return ErrWouldBlock
		}
		buf := da.buffers.tryTake()
		if buf == nil {
			var err error
			if buf, err = da.buffers.take(ctx, da.stop); err != nil {
				c.lock.release()
				if errors.Is(err, errClosing) {
					return ErrClosed
				}
				return err
			}
		}
		c.buf = buf
		if err := da.loadChunk(c); err != nil {
			da.setCorrupted(err)
			da.failChunk(c)
			return fmt.Errorf("write image %s: %w: %w", da.name, ErrCorrupted, err)
		}
		fill(c.buf.data[coff:coff+l], src)
		da.setChunkState(c, ChunkNew, ChunkInMemory)
		da.scheduleStoring(c)
	case ChunkInMemory:
		fill(c.buf.data[coff:coff+l], src)
	case ChunkStored:
		if err := writeRegion(c.region, src, coff, l); err != nil {
			da.setCorrupted(err)
			c.lock.release()
			return fmt.Errorf("write image %s chunk #%d: %w: %w", da.name, nr, ErrCorrupted, err)
		}
	case ChunkFailed:
		c.lock.release()
		return ErrCorrupted
	}
	c.lock.release()
	return nil
}

// fill copies src to dst, or zeroes dst if src is nil.
func fill(dst, src []byte) {
	if src == nil {
		clear(dst)
	} else {
		copy(dst, src)
	}
}

// writeRegion writes l bytes of src (zeros if nil) at off of a region.
func writeRegion(r storage.DiffRegion, src []byte, off, l int64) error {
	if src != nil {
		return r.WriteAt(src, off)
	}
	for l > 0 {
		k := min(l, int64(len(zeros)))
		if err := r.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
		l -= k
	}
	return nil
}

// ImageReadsOriginal reports whether the image reads chunk nr from the
// original device, that is, no write has copied it since the take. A
// write to the original copies the chunk before it changes the original,
// so while this holds the original still has the image's bytes.
func (da *DiffArea) ImageReadsOriginal(nr uint64) bool { return isNew(da.lookup(nr)) }

// ImageReadPlan receives how an image read is served when its data should
// not pass through the engine (a ring that reads straight into the
// request): ReadFrom asks for n bytes at off of dev to be read into the
// request at byte at, later; Fill puts p there now. stale, when not 0, is
// the token to give OriginalReadStale once that read has completed.
type ImageReadPlan interface {
	ReadFrom(dev storage.Device, off int64, at, n int, stale uint64)
	Fill(p []byte, at int) error
}

// BeginImageRead plans the image read of n bytes at off into plan, chunk
// by chunk: an untouched chunk reads from the original (with a stale
// token), a stored one from its region, one held in memory is filled now
// under its lock. On success the area stays entered (it cannot close)
// until EndImageRead, which the caller calls once the reads are done; on
// error nothing is held. With nowait, a busy chunk answers ErrWouldBlock.
func (da *DiffArea) BeginImageRead(ctx context.Context, off int64, n int, plan ImageReadPlan, nowait bool) error {
	if err := da.checkRange("read image", off, int64(n)); err != nil {
		return err
	}
	if !da.enter() {
		return ErrClosed
	}
	err := da.forEachChunk(off, int64(n), func(nr uint64, coff, pos, l int64) error {
		return da.planImageChunk(ctx, nr, coff, int(pos), int(l), plan, nowait)
	})
	if err != nil {
		da.leave()
	}
	return err
}

// planImageChunk plans one segment of chunk nr (see BeginImageRead).
func (da *DiffArea) planImageChunk(ctx context.Context, nr uint64, coff int64, at, n int, plan ImageReadPlan, nowait bool) error {
	if da.corrupted.Load() {
		return ErrCorrupted
	}
	c := da.lookup(nr)
	if isNew(c) {
		// Stale if the chunk is copied before the read ends, as in
		// readImageChunk.
		plan.ReadFrom(da.orig, int64(nr)<<da.chunkShift+coff, at, n, nr+1)
		return nil
	}
	if err := da.lockChunk(ctx, c, nowait); err != nil {
		return err
	}
	defer c.lock.release()
	switch c.State() {
	case ChunkNew:
		plan.ReadFrom(da.orig, int64(nr)<<da.chunkShift+coff, at, n, nr+1)
	case ChunkInMemory:
		return plan.Fill(c.buf.data[coff:coff+int64(n)], at)
	case ChunkStored:
		// A region never moves: the read may run after the lock is gone.
		plan.ReadFrom(c.region.Dev, c.region.Sector<<storage.SectorShift+coff, at, n, 0)
	case ChunkFailed:
		return ErrCorrupted
	}
	return nil
}

// OriginalReadStale reports whether the original read of a plan whose
// token is stale may have seen data newer than the snapshot: its chunk
// was copied since it was planned. The caller plans the read again.
func (da *DiffArea) OriginalReadStale(stale uint64) bool {
	return stale != 0 && !isNew(da.lookup(stale-1))
}

// EndImageRead ends a read BeginImageRead planned, once its reads are
// done: ErrCorrupted if the area was corrupted meanwhile (COW is off then,
// and what the original gave may be newer than the snapshot).
func (da *DiffArea) EndImageRead() error {
	defer da.leave()
	return da.checkCorrupted()
}
