package cow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ublksnap/ublksnap/internal/admit"
	"github.com/ublksnap/ublksnap/internal/broadcast"
	"github.com/ublksnap/ublksnap/storage"
)

// Sentinel errors of the chunk engine.
var (
	// ErrWouldBlock is returned by a nowait call that would have to wait
	// for a chunk or load one, or for chunk buffer budget. It matches
	// syscall.EAGAIN, so the ublk package treats it as its own would-block
	// answer.
	ErrWouldBlock = fmt.Errorf("cow: operation would block: %w", syscall.EAGAIN)
	// ErrCorrupted is returned by every image I/O once the difference area
	// is corrupted. It matches syscall.EIO.
	ErrCorrupted = fmt.Errorf("cow: snapshot image corrupted: %w", syscall.EIO)
	// ErrPending is returned by the asynchronous entry points when the
	// completion callback will be called later, from another goroutine.
	ErrPending = errors.New("cow: request pending")
	// ErrClosed is returned by the image I/O of a DiffArea after Close
	// (and by a second Close). It matches syscall.EIO, the answer of an
	// image whose snapshot is going away.
	ErrClosed = fmt.Errorf("cow: difference area closed: %w", syscall.EIO)
	// ErrCloseTimeout is wrapped by Close when requests or the store
	// worker did not come back in time.
	ErrCloseTimeout = errors.New("cow: requests still in I/O when the close timed out")
)

// maxStoreWorkers is how many chunks of one area are stored at once, each
// by a worker of its own: a storage that takes several writes in flight
// (any disk, and io_uring's workers on a file) stores that much faster,
// and the writers that wait for buffers wait that much less.
const maxStoreWorkers = 4

// storeRetryDelay is how long the store worker pauses when every queued
// chunk is locked by someone else.
const storeRetryDelay = 50 * time.Microsecond

// DiffArea is the difference area of one original device in one snapshot
// (blksnap's struct diff_area): the chunk map, the store queue and the
// buffer pool. See the package documentation for the model.
type DiffArea struct {
	orig        storage.Device       // the original device; immutable
	name        string               // orig's name, for logs and events; immutable
	diffStorage *storage.DiffStorage // the snapshot's difference storage; immutable
	log         *slog.Logger         // immutable
	params      Params               // copied at creation; immutable

	size          int64  // capacity of the original in bytes; immutable
	chunkShift    uint   // log2 of the chunk size in bytes; immutable
	chunkCount    uint64 // chunks covering the device, the last maybe short; immutable
	logicalBlksz  int    // logical block size of the original (and the image); immutable
	physicalBlksz int    // physical block size of the original (and the image); immutable

	// chunks is the sparse map of the chunks touched so far, read and
	// added to without a lock. Chunks are only added, never removed.
	chunks *chunkTable
	// jobs hands requests whose COW must wait to an idle worker
	// (runAsync); unbuffered, so that a job goes only to a worker ready
	// for it.
	jobs chan asyncJob
	// batches keeps the spare batches of cow passes.
	batches batchCache
	// slab is where new chunks come from (newChunk).
	slab atomic.Pointer[chunkSlab]

	// storeMu guards the store queue: the InMemory chunks waiting to be
	// written to the difference storage, in the order they were loaded;
	// storeWorkers, the store workers started (at most maxStoreWorkers;
	// each waits on storeWake when out of work, until Close) and
	// storeBusy, those storing; and storeIdle, broadcast when storeBusy
	// drops to 0.
	storeMu      sync.Mutex
	storeQueue   []*Chunk
	storeWorkers int
	storeBusy    int
	storeIdle    broadcast.Signal
	storeWake    chan struct{} // wakes a waiting store worker; maxStoreWorkers slots; immutable
	// draining makes the store worker store every queued chunk (Drain);
	// set once, under storeMu.
	draining bool

	buffers *diffBufferPool // the chunk buffers, bounded by a BufferBudget; immutable

	// inMemory counts the chunks in state InMemory, each holding a buffer;
	// inMemoryPeak is its highest value. Both change with the state, under
	// the chunk's lock.
	inMemory     atomic.Int64
	inMemoryPeak atomic.Int64

	// kernelCopy is set while chunks are saved by an in-kernel copy
	// (Params.ChunkCopyInKernel), and cleared for good the first time the
	// kernel refuses one; kernelCopied counts the chunks so saved.
	kernelCopy   atomic.Bool
	kernelCopied atomic.Int64

	// corrupted is set once, by setCorrupted; errorCode is the errno that
	// caused it, written before corrupted is set.
	corrupted atomic.Bool
	errorCode atomic.Int32

	// ctx is cancelled by Close; stop is its Done channel. Waits for a
	// chunk or a buffer end with errClosing when it is closed.
	ctx    context.Context
	cancel context.CancelFunc
	stop   <-chan struct{}

	// door counts the requests inside the area, each admitted and let
	// out by one atomic operation; Close closes it for good and waits for
	// it to drain (and for no store worker).
	door admit.Door
}

// Option configures a DiffArea at creation.
type Option func(*options)

// options are what the Options set.
type options struct {
	budget *BufferBudget // nil: one of the area's own
}

// WithBufferBudget makes the area draw its chunk buffers on b, shared with
// the other areas given it, instead of a budget of its own of
// Params.DiffBufferMemoryLimit bytes.
func WithBufferBudget(b *BufferBudget) Option {
	return func(o *options) { o.budget = b }
}

// NewDiffArea creates the difference area of orig in a snapshot whose
// difference storage is ds. The chunk size is computed from orig's geometry
// and params, which must be valid. log may be nil. Its chunk buffers are
// bounded by a budget of its own of params.DiffBufferMemoryLimit bytes,
// unless WithBufferBudget gives a shared one.
func NewDiffArea(orig storage.Device, ds *storage.DiffStorage, params Params, log *slog.Logger, opts ...Option) (*DiffArea, error) {
	if err := params.Validate(); err != nil {
		return nil, err
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if o.budget == nil {
		o.budget = NewBufferBudget(params.DiffBufferMemoryLimit)
	}
	geo := orig.Geometry()
	if geo.Size <= 0 || geo.LogicalBlockSize < storage.SectorSize || geo.Size%int64(geo.LogicalBlockSize) != 0 {
		return nil, fmt.Errorf("difference area for %s: size %d is not a positive multiple of the %d-byte block: %w",
			orig.Name(), geo.Size, geo.LogicalBlockSize, syscall.EINVAL)
	}
	shift, err := params.ChunkShift(geo)
	if err != nil {
		return nil, fmt.Errorf("difference area for %s: %w", orig.Name(), err)
	}
	if ds.Stats().Capacity == 0 {
		return nil, fmt.Errorf("difference area for %s: the difference storage is empty: %w", orig.Name(), syscall.EFAULT)
	}
	if log == nil {
		log = slog.Default()
	}
	chunkBytes := 1 << shift
	ctx, cancel := context.WithCancel(context.Background())
	da := &DiffArea{
		orig:          orig,
		name:          orig.Name(),
		diffStorage:   ds,
		log:           log.With("component", "diff-area", "dev", orig.Name()),
		params:        params,
		size:          geo.Size,
		chunkShift:    shift,
		chunkCount:    uint64(countByShift(geo.Size, shift)),
		logicalBlksz:  geo.LogicalBlockSize,
		physicalBlksz: geo.PhysicalBlockSize,
		chunks:        newChunkTable(uint64(countByShift(geo.Size, shift))),
		ctx:           ctx,
		cancel:        cancel,
		stop:          ctx.Done(),
		jobs:          make(chan asyncJob),
		storeWake:     make(chan struct{}, maxStoreWorkers),
	}
	da.kernelCopy.Store(params.ChunkCopyInKernel == 1 && storage.KernelCopyable(orig))
	da.buffers = newDiffBufferPool(chunkBytes, params.FreeDiffBufferPoolSize, o.budget, da.kick)
	da.log.Debug("difference area created", "chunk_bytes", chunkBytes, "chunks", da.chunkCount)
	return da, nil
}

// runAsync runs j on an idle worker of the area, or on a new one if all
// are busy. A worker waits for the next job once done, until Close, so
// that in a steady stream of first writes no request starts a goroutine
// (or allocates): the workers are as many as the most jobs ever at once,
// at most the requests the device has in flight.
func (da *DiffArea) runAsync(j asyncJob) {
	select {
	case da.jobs <- j:
	default:
		go da.asyncWorker(j)
	}
}

// asyncWorker runs j, then the jobs it is handed, until the area closes.
func (da *DiffArea) asyncWorker(j asyncJob) {
	for {
		j.run()
		select {
		case j = <-da.jobs:
		case <-da.stop:
			return
		}
	}
}

// Original returns the original device of the area.
func (da *DiffArea) Original() storage.Device { return da.orig }

// Name returns the original device's name.
func (da *DiffArea) Name() string { return da.name }

// Size returns the capacity of the original and of the image, in bytes.
func (da *DiffArea) Size() int64 { return da.size }

// ChunkSize returns the chunk size in bytes.
func (da *DiffArea) ChunkSize() int64 { return 1 << da.chunkShift }

// BlockSizes returns the logical and physical block sizes the image must
// have: those of the original.
func (da *DiffArea) BlockSizes() (logical, physical int) { return da.logicalBlksz, da.physicalBlksz }

// Corrupted reports whether the area is corrupted, and the errno that
// corrupted it.
func (da *DiffArea) Corrupted() (bool, syscall.Errno) {
	if !da.corrupted.Load() {
		return false, 0
	}
	return true, syscall.Errno(da.errorCode.Load())
}

// Stats describes the memory use of a DiffArea.
type Stats struct {
	Chunks        int // chunks in the map
	Queued        int // chunks waiting in the store queue
	BuffersLive   int // chunk buffers allocated (in use and free)
	BuffersPeak   int // highest BuffersLive so far
	BuffersLimit  int // the bound on BuffersLive: the budget in buffers (shared: if the other areas hold none)
	InMemoryPeak  int // most chunks InMemory at one instant, counted exactly
	KernelCopied  int // chunks saved by an in-kernel copy, without a buffer
	ChunkSize     int64
	ChunksInState [4]int // chunks per ChunkState (counted under each chunk's lock-free state)
}

// Stats returns current counts; it walks the chunk map.
func (da *DiffArea) Stats() Stats {
	var s Stats
	da.chunks.each(func(c *Chunk) bool {
		s.Chunks++
		s.ChunksInState[c.State()]++
		return true
	})
	da.storeMu.Lock()
	s.Queued = len(da.storeQueue)
	da.storeMu.Unlock()
	s.BuffersLive, s.BuffersPeak = da.buffers.stats()
	s.BuffersLimit = da.buffers.limit()
	s.InMemoryPeak = int(da.inMemoryPeak.Load())
	s.KernelCopied = int(da.kernelCopied.Load())
	s.ChunkSize = da.ChunkSize()
	return s
}

// BufferBudget returns the budget the area's chunk buffers draw on.
func (da *DiffArea) BufferBudget() *BufferBudget { return da.buffers.budget }

// enter registers a request; it fails once Close has started.
func (da *DiffArea) enter() bool { return da.door.TryEnter() }

// leave ends a request registered by enter.
func (da *DiffArea) leave() { da.door.Leave() }

// chunkSpan returns the numbers of the first and last chunks of n > 0
// bytes at off.
func (da *DiffArea) chunkSpan(off, n int64) (first, last uint64) {
	return uint64(off >> da.chunkShift), uint64((off + n - 1) >> da.chunkShift)
}

// chunkSectors returns the sector count of chunk nr.
func (da *DiffArea) chunkSectors(nr uint64) int64 {
	start := int64(nr) << da.chunkShift
	return min(int64(1)<<da.chunkShift, da.size-start) >> storage.SectorShift
}

// lookup returns chunk nr, or nil if it was never touched.
func (da *DiffArea) lookup(nr uint64) *Chunk { return da.chunks.lookup(nr) }

// chunkGet returns chunk nr, adding a New chunk to the map if needed.
func (da *DiffArea) chunkGet(nr uint64) *Chunk {
	if c := da.lookup(nr); c != nil {
		return c
	}
	return da.chunks.getOrAdd(nr, da.newChunk(nr))
}

// newChunk returns a New chunk nr, not in the map yet, from the current
// slab (a chunk that loses the race to enter the map stays unused there).
func (da *DiffArea) newChunk(nr uint64) *Chunk {
	for {
		s := da.slab.Load()
		if s != nil {
			if i := s.next.Add(1) - 1; i < chunkSlabSize {
				c := &s.chunks[i]
				c.number, c.sectorCount = nr, da.chunkSectors(nr)
				return c
			}
		}
		da.slab.CompareAndSwap(s, new(chunkSlab))
	}
}

// checkRange validates an I/O range against the device.
func (da *DiffArea) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off+n > da.size || off%storage.SectorSize != 0 || n%storage.SectorSize != 0 {
		return fmt.Errorf("%s %s [%d+%d]: outside the %d-byte device or not sector-aligned: %w", op, da.name, off, n, da.size, syscall.EINVAL)
	}
	return nil
}

// loadChunk reads chunk c's data from the original into its buffer;
// c.lock must be held and c.buf set.
func (da *DiffArea) loadChunk(c *Chunk) error {
	if _, err := da.orig.ReadAt(c.buf.data[:c.bytes()], int64(c.number)<<da.chunkShift); err != nil {
		return fmt.Errorf("load chunk #%d of %s: %w", c.number, da.name, err)
	}
	return nil
}

// scheduleStoring puts a chunk that just became InMemory on the store
// queue and kicks the store worker when more than chunk_maximum_in_queue
// chunks wait or a writer starves for a buffer. c.lock must be held; the
// caller releases it afterwards.
func (da *DiffArea) scheduleStoring(c *Chunk) {
	da.storeMu.Lock()
	defer da.storeMu.Unlock()
	if !c.queued {
		c.queued = true
		da.storeQueue = append(da.storeQueue, c)
	}
	da.kickLocked()
}

// kick starts the store worker if there is work for it.
func (da *DiffArea) kick() {
	da.storeMu.Lock()
	defer da.storeMu.Unlock()
	da.kickLocked()
}

// kickLocked is kick: it sets store workers to work, up to
// maxStoreWorkers and no more than chunks wait, waking those that wait
// before starting new ones; da.storeMu must be held.
func (da *DiffArea) kickLocked() {
	for da.storeBusy < min(maxStoreWorkers, len(da.storeQueue)) && da.storeNeededLocked() {
		da.storeBusy++
		if da.storeBusy <= da.storeWorkers {
			da.storeWake <- struct{}{} // a slot per worker: never blocks
			continue
		}
		da.storeWorkers++
		go da.storeWorker()
	}
}

// storeNeededLocked reports whether the store worker should run: queued
// chunks beyond the limit, a writer of any area sharing the budget
// starving for a buffer, or a corrupted area whose queued buffers should
// be freed. da.storeMu must be held.
func (da *DiffArea) storeNeededLocked() bool {
	n := len(da.storeQueue)
	if n == 0 || da.ctx.Err() != nil {
		return false
	}
	return n > da.params.ChunkMaximumInQueue || da.corrupted.Load() || da.buffers.starving() || da.draining
}

// storeWorker stores queued chunks while storeNeededLocked holds (blksnap's
// store_queue_work), beside the area's other workers, each taking the
// first chunk free.
// Out of work, it waits to be woken by kickLocked (which counted it busy
// again), or leaves once the area closes.
func (da *DiffArea) storeWorker() {
	for {
		da.storeMu.Lock()
		if !da.storeNeededLocked() {
			if da.storeBusy--; da.storeBusy == 0 {
				da.storeIdle.Broadcast()
			}
			da.storeMu.Unlock()
			select {
			case <-da.storeWake:
				continue
			case <-da.stop:
				da.storeStopped()
				return // touching nothing more: Close may free the area now
			}
		}
		c := da.storeTakeLocked()
		da.storeMu.Unlock()
		if c == nil {
			// Every queued chunk is busy for a moment (an image request
			// or a state check holds it); try again shortly.
			time.Sleep(storeRetryDelay)
			continue
		}
		da.storeChunk(c) // survives a panic, keeping c.lock
		c.lock.release() // exactly once, whatever happened
	}
}

// storeStopped is the end of a store worker that left on Close: a wake
// token sent to the waiting workers just before Close (kickLocked sends
// none after) counted one of them busy; whoever leaves takes the tokens
// back, so that the count of busy workers Close waits for drops to 0.
func (da *DiffArea) storeStopped() {
	da.storeMu.Lock()
	defer da.storeMu.Unlock()
	for len(da.storeWake) > 0 {
		<-da.storeWake
		da.storeBusy--
	}
	if da.storeBusy == 0 {
		da.storeIdle.Broadcast()
	}
}

// storeTakeLocked removes and returns the first queued chunk whose lock it
// can take, skipping busy ones, or nil. da.storeMu must be held.
func (da *DiffArea) storeTakeLocked() *Chunk {
	for i, c := range da.storeQueue {
		if c.lock.tryAcquire() {
			copy(da.storeQueue[i:], da.storeQueue[i+1:])
			da.storeQueue[len(da.storeQueue)-1] = nil
			da.storeQueue = da.storeQueue[:len(da.storeQueue)-1]
			c.queued = false
			return c
		}
	}
	return nil
}

// storeChunk writes an InMemory chunk to its region, allocating the region
// on the first store; c.lock must be held, and stays held. A failure, or a
// panic (a bug, or a device that panics), corrupts the area and fails the
// chunk, freeing its buffer: the worker goes on, and so does every other
// device.
func (da *DiffArea) storeChunk(c *Chunk) {
	defer func() {
		if r := recover(); r != nil {
			da.log.Error("panic while storing a chunk", "chunk", c.number, "panic", r, "stack", string(debug.Stack()))
			da.setCorrupted(fmt.Errorf("panic while storing chunk #%d: %v: %w", c.number, r, syscall.EIO))
			da.failChunkLocked(c)
		}
	}()
	if c.State() != ChunkInMemory {
		// Only loaded chunks are queued, and only the worker takes them
		// out of the queue.
		da.log.Warn("queued chunk is not in memory", "chunk", c.number, "state", c.State())
		return
	}
	if da.corrupted.Load() {
		da.failChunkLocked(c)
		return
	}
	if err := da.allocRegion(c); err != nil {
		da.setCorrupted(err)
		da.failChunkLocked(c)
		return
	}
	if err := c.region.WriteAt(c.buf.data[:c.bytes()], 0); err != nil {
		da.setCorrupted(fmt.Errorf("store chunk #%d: %w", c.number, err))
		da.failChunkLocked(c)
		return
	}
	da.setChunkState(c, ChunkInMemory, ChunkStored)
	da.dropBuffer(c)
}

// allocRegion gives c a region of the difference storage, unless it has
// one; c.lock must be held.
func (da *DiffArea) allocRegion(c *Chunk) error {
	if c.region.Dev != nil {
		return nil
	}
	r, err := da.diffStorage.Alloc(int64(1)<<(da.chunkShift-storage.SectorShift), da.logicalBlksz)
	if err != nil {
		return fmt.Errorf("allocate region for chunk #%d: %w", c.number, err)
	}
	c.region = r
	return nil
}

// setChunkState moves c from one state to another and keeps the count of
// InMemory chunks; c.lock must be held.
func (da *DiffArea) setChunkState(c *Chunk, from, to ChunkState) {
	c.setState(from, to)
	switch {
	case to == ChunkInMemory:
		n := da.inMemory.Add(1)
		for {
			peak := da.inMemoryPeak.Load()
			if n <= peak || da.inMemoryPeak.CompareAndSwap(peak, n) {
				break
			}
		}
	case from == ChunkInMemory:
		da.inMemory.Add(-1)
	}
}

// failChunk marks a chunk Failed, frees its buffer and releases c.lock.
func (da *DiffArea) failChunk(c *Chunk) {
	da.failChunkLocked(c)
	c.lock.release()
}

// failChunkLocked marks a chunk Failed and frees its buffer; c.lock must
// be held, and stays held.
func (da *DiffArea) failChunkLocked(c *Chunk) {
	if ChunkState(c.state.Swap(uint32(ChunkFailed))) == ChunkInMemory { // any state may fail
		da.inMemory.Add(-1)
	}
	da.dropBuffer(c)
}

// dropBuffer returns c's buffer, if it has one, to the pool; c.lock must
// be held (or nothing else run, as in free). c.buf is cleared first, so
// that the buffer is never returned twice.
func (da *DiffArea) dropBuffer(c *Chunk) {
	if b := c.buf; b != nil {
		c.buf = nil
		da.buffers.release(b)
	}
}

// Corrupt marks the area corrupted, as any failure of the COW machinery
// does: once, with err's errno (EIO if it carries none), one corrupted
// event, COW off for the device and image I/O failing from then on. It is
// for callers that caught a failure outside the engine, such as a panic
// while serving a request.
func (da *DiffArea) Corrupt(err error) { da.setCorrupted(err) }

// setCorrupted marks the area corrupted, once: it records the errno of err
// (EIO if it carries none), posts one corrupted event and stops COW for the
// device. Later calls do nothing.
func (da *DiffArea) setCorrupted(err error) {
	errno := syscall.EIO
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		errno = e
	}
	da.storeMu.Lock()
	if da.corrupted.Load() {
		da.storeMu.Unlock()
		return
	}
	da.errorCode.Store(int32(errno))
	da.corrupted.Store(true)
	da.kickLocked() // drop the queued buffers
	da.storeMu.Unlock()
	da.log.Error("snapshot of the device is corrupted", "errno", int(errno), "err", err)
	da.diffStorage.Events().Post(storage.Event{Code: storage.EventCorrupted, Device: da.name, Errno: errno})
}

// Close stops the area: it waits for the requests inside it (those blocked
// on a chunk or a buffer give up without COW), stops the store worker and
// frees the chunks. It does not close the original or the difference
// storage. Queued chunks are not stored: the snapshot is going away.
//
// If ctx ends first (requests or the store worker are stuck in I/O on a
// hung device), the area is corrupted with ETIMEDOUT, so that every
// request that can still move fails with EIO and COW is off, and Close
// returns an error wrapping ErrCloseTimeout; the chunks are freed in the
// background once the stuck goroutines come back, never under them.
func (da *DiffArea) Close(ctx context.Context) error {
	if !da.door.Close() {
		return ErrClosed
	}
	da.cancel()
	if err := da.waitIdle(ctx); err == nil {
		da.free()
		return nil
	}
	da.setCorrupted(fmt.Errorf("close with requests stuck in I/O: %w", syscall.ETIMEDOUT))
	go func() {
		_ = da.waitIdle(context.Background()) // no deadline: it cannot fail
		da.free()
	}()
	return fmt.Errorf("close difference area of %s: %w (%w)", da.name, ErrCloseTimeout, context.Cause(ctx))
}

// waitIdle waits until no request is inside the area and the store worker
// has stopped, or ctx ends (ctx.Err()). After Close's cancel neither can
// start again. An idle area is seen as idle whatever the state of ctx.
func (da *DiffArea) waitIdle(ctx context.Context) error {
	if err := da.door.Drain(ctx); err != nil {
		return err
	}
	return waitUntil(ctx, &da.storeMu, &da.storeIdle, func() bool { return da.storeBusy == 0 })
}

// waitUntil waits until cond, which mu guards, holds; sig is broadcast
// under mu when it may have changed. It fails with ctx.Err() when ctx ends
// first.
func waitUntil(ctx context.Context, mu *sync.Mutex, sig *broadcast.Signal, cond func() bool) error {
	mu.Lock()
	defer mu.Unlock()
	for !cond() {
		ch := sig.Wait()
		mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			mu.Lock()
			if cond() {
				return nil
			}
			return ctx.Err()
		}
		mu.Lock()
	}
	return nil
}

// free drops the store queue and the chunks' buffers, returning their
// bytes to the budget, once no request and no store worker runs.
func (da *DiffArea) free() {
	da.storeMu.Lock()
	clear(da.storeQueue)
	da.storeQueue = nil
	da.storeMu.Unlock()
	da.chunks.each(func(c *Chunk) bool {
		da.dropBuffer(c)
		return true
	})
	da.buffers.close()
}
