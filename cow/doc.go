// Package cow is the chunk engine of ublksnap: the copy-on-write of an
// original device into the difference storage of a snapshot, and the I/O of
// the snapshot image. It follows blksnap's diff_area, chunk and diff_buffer
// and builds on package storage; it knows nothing of ublk.
//
// # Objects
//
//	Original   an original device; its data-changing requests go through COW
//	DiffArea   one original device in one snapshot: chunk map, store queue,
//	           buffer pool, corruption flag
//	Chunk      2^chunkShift bytes of the original (the last may be short),
//	           with a state and a binary semaphore
//	DiffBuffer the in-memory copy of one chunk
//	BufferBudget
//	           the bytes of chunk buffers the areas sharing it may hold
//
// The chunk size is computed at creation from the device's capacity and
// minimum I/O size and the Params (blksnap's chunk_minimum_shift,
// chunk_maximum_count_shift, chunk_maximum_shift). The chunk map is sparse:
// a Chunk exists only once the chunk was first written on either side, so
// memory grows with the chunks touched, not with the device.
//
// # Chunk states
//
//	New ──load──▶ InMemory ──store──▶ Stored        any ──failure──▶ Failed
//
// New: the snapshot's data is still on the original. InMemory: it is in a
// DiffBuffer and the chunk waits in the store queue. Stored: it is in a
// region of the difference storage. Failed: it is lost and the area is
// corrupted. A chunk never returns to New; that is what lets readers look at
// the state without the lock.
//
// # Locks and who releases what
//
//   - Chunk.lock, a binary semaphore (not a mutex: no owner). A writer takes
//     it for each New chunk it touches, in ascending order, keeps it while
//     the chunk is loaded, and releases it after queueing the chunk. The
//     store worker takes it with tryAcquire (busy chunks are skipped) and
//     releases it after the store. Image requests take it around each
//     chunk's copy. It guards Chunk.buf, Chunk.region and every state
//     change.
//   - The chunk map needs no lock: a two-level table of atomic pointers,
//     added to by compare-and-swap (chunks are only added).
//   - DiffArea.storeMu guards the store queue and the workers' counts.
//   - DiffArea.door (admit.Door) counts the requests inside the area, with
//     its closed bit, in one atomic word: no lock for a request.
//   - diffBufferPool.mu guards an area's free buffers and counts.
//   - BufferBudget.mu guards the budget's bytes, its queue of waiters and
//     its member pools; the budget calls nothing while holding it.
//     Order: storeMu before BufferBudget.mu, pool.mu before
//     BufferBudget.mu; no lock is held during I/O except chunk locks.
//
// Waits for a condition under one of these mutexes (no request left, the
// worker stopped) use a broadcast.Signal kept under that mutex; a wait for
// buffer budget has a channel of its own, closed when it is granted.
//
// # Copy on write
//
// Original.Write (and Discard, WriteZeroes) calls DiffArea.cow before
// touching the original: every New chunk of the range is locked, gets a
// buffer, is read whole from the original, becomes InMemory, is queued and
// is released; only then, with all its chunks loaded, does the request
// reach the original. The write waits for the read of the old data, never
// for the store. Chunks already InMemory, Stored or Failed do not delay it.
//
// Where the original and the difference storage are regular files
// (Params.ChunkCopyInKernel, on by default), a New chunk takes no buffer:
// it gets its region at once and is copied there by the kernel
// (storage.CopyRange, copy_file_range), a run of neighbouring chunks of
// one request into neighbouring regions in one call, and goes straight
// from New to Stored. The write then waits for the copy rather than for a
// read, but nothing crosses into this process, no buffer is held and no
// store follows; an image read over those chunks is one read of the
// storage. The first copy the kernel refuses (files of two file systems)
// turns it off for the area, and the chunks go through buffers as below.
//
// With nowait (the ublk queue goroutine), COW only looks: if a chunk of the
// range is New it answers ErrWouldBlock (syscall.EAGAIN) having changed
// nothing, and the request is retried where blocking is allowed.
// Original.WriteAsync packages both: it writes at once when it can and
// otherwise returns ErrPending and finishes on a worker of the area: an
// idle one if there is one (they wait for the next job until Close), a new
// one otherwise, so that a stream of first writes starts no goroutine and
// allocates nothing per request. Chunks come from slabs, the passes'
// batches are kept for reuse, and the chunk map is read and added to
// without a lock.
//
// # Store queue and memory bound
//
// Loaded chunks wait in the store queue. The store worker (up to four per
// area, each storing one chunk at a time, so that several stores are in
// flight) runs when more than chunk_maximum_in_queue chunks wait, when a
// writer starves for a buffer, or when the area is corrupted (to free the
// buffers); it allocates a region on a chunk's first store, writes the
// buffer there, marks the chunk Stored and returns the buffer to the pool.
//
// Every live buffer, in use or kept free, holds its size in bytes of a
// BufferBudget. An area given none (NewDiffArea without
// WithBufferBudget) has one of its own of DiffBufferMemoryLimit bytes; the
// snapshot manager gives every area it creates one budget of
// DiffBufferMemoryLimit bytes, so that all the devices of all snapshots
// together hold at most that much, not that much each. A writer whose
// buffer does not fit waits in turn (first come first served, whatever
// the area; a nowait try answers ErrWouldBlock); one buffer is always
// admitted when the budget holds nothing, so a chunk larger than the
// budget still proceeds. When a writer starts waiting, every area of the
// budget drops its free buffers and kicks its store worker, which then
// runs while anyone waits; a freed buffer then goes to the first waiter
// if it has the size asked for, or back to the budget, rather than to the
// free list. Only while nobody waits does an area keep up to
// free_diff_buffer_pool_size free buffers for reuse, and they count
// against the budget. Writers never wait for a buffer or a chunk while
// holding buffers of chunks they have not loaded yet (they load and queue
// those first), and the store worker never waits for a writer, so every
// byte held comes back and the bound cannot deadlock, across areas too.
//
// # Snapshot image
//
// ReadImage: New (or untouched) chunk → the original, InMemory → the
// buffer, Stored → the difference storage, Failed → ErrCorrupted. WriteImage
// never reaches the original: a New chunk is loaded and changed in memory
// and queued, an InMemory chunk is changed in memory, a Stored chunk is
// written in its region.
//
// # Corruption
//
// Any failure of the COW machinery (no space, an error reading the original
// or reading or writing the difference storage) marks the area corrupted
// once: the errno is recorded, one storage.EventCorrupted is posted on the
// snapshot's event queue, COW stops for the device, queued chunks fail and
// every later image request fails with ErrCorrupted (syscall.EIO). The
// request on the original that hit the failure proceeds unharmed; the
// original is never failed or delayed by snapshot trouble beyond the load.
//
// A panic while storing a chunk (a bug, or a device that panics) is such a
// failure too: the store worker recovers, corrupts the area with EIO, fails
// the chunk, frees its buffer, releases its lock once and goes on. Callers
// that catch a failure outside the engine (a panic serving a request)
// report it with DiffArea.Corrupt.
//
// # Close
//
// DiffArea.Close(ctx) turns new requests away (image I/O fails, the
// original is written without COW), wakes those waiting for a chunk or a
// buffer, and waits for the requests inside and the store worker; an idle
// area closes cleanly whatever the state of ctx. If ctx ends first because
// I/O hangs on a device, the area is corrupted with ETIMEDOUT and Close
// returns an error wrapping ErrCloseTimeout; the goroutines stuck in I/O
// stay there, and the chunk map and buffers are freed only once they come
// back, never under them.
package cow
