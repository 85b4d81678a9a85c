package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"slices"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// The handlers follow ublk's contract. A filtered device backed by a file
// with a descriptor (storage.File) serves every request as backing I/O on
// the queue's ring (its DataFD is the device's registered file 0): reads,
// flushes and writes that need no COW never leave the queue thread, and
// what would block is io_uring's business. What must wait in this process
// runs elsewhere: a write whose chunks must be copied first is prepared on
// a goroutine of the engine and then submitted, and a write the gate holds
// (a take pausing the device) waits on a worker. A backing device without
// a descriptor (the fakes of the host tests) is served synchronously from
// the request's buffer, as before ring I/O: on the queue thread only what
// needs no waiting, the rest on a worker. A panic while serving a request
// fails only that request with EIO and corrupts the snapshot involved;
// every other device goes on.

// dataFile is a backing device with a descriptor for ring I/O.
type dataFile interface {
	DataFD() int
}

// backingFiles returns the descriptors a device over dev registers on its
// queue rings (ublk.Config.Files): its data descriptor, if it has one, and
// for a backing read and written with O_DIRECT its cached descriptor
// beside it (see directFallback).
func backingFiles(dev storage.Device) []int {
	if f, ok := dev.(*storage.File); ok && f.DirectIO() {
		return []int{f.DataFD(), f.CachedFD()}
	}
	if f, ok := dev.(dataFile); ok {
		return []int{f.DataFD()}
	}
	return nil
}

// privCached, a bit of the Private word of both handlers, marks a request
// whose ring I/O goes through the backing's page cache after O_DIRECT
// refused it.
const privCached = 1 << 7

// directFallback lets a handler over a backing read and written with
// O_DIRECT (registered file 0; its cached descriptor is file 1) serve a
// request that O_DIRECT refuses (EINVAL) through the page cache instead
// of failing it. None should come: the block layer aligns every
// request's offset and length to the logical block size, which is at
// least the backing's direct I/O alignment, and its memory to the
// device's 512-byte DMA alignment (storage.OpenOptions.Direct checks
// both); but a kernel that relaxes a rule for the requests it sends
// must not turn that into I/O errors of the user's file system.
type directFallback struct {
	on     bool        // the backing is read and written with O_DIRECT; immutable
	warned atomic.Bool // a fallback was logged (once per device)
}

// file returns the registered file that req's backing I/O goes to.
func (f *directFallback) file(req *ublk.Request) ublk.File {
	if req.Private&privCached != 0 {
		return ublk.RegisteredFile(1)
	}
	return ublk.RegisteredFile(0)
}

// retry reports whether a read or write whose ring I/O failed with err
// must be issued again through the page cache, and marks it so.
func (f *directFallback) retry(req *ublk.Request, err error, log *slog.Logger) bool {
	if !f.on || req.Private&privCached != 0 || !errors.Is(err, unix.EINVAL) || (req.Op != ublk.OpRead && req.Op != ublk.OpWrite) {
		return false
	}
	if !slices.ContainsFunc(req.IOs(), func(io ublk.IO) bool { file, _, _, _ := io.Data(); return file == ublk.RegisteredFile(0) }) {
		return false // the refusal was not of the backing
	}
	req.Private |= privCached
	if !f.warned.Swap(true) {
		log.Warn("O_DIRECT refused a request: it, and any other it refuses, goes through the page cache", "req", req.String(), "err", err)
	}
	return true
}

// Private words of the original handler's requests.
const (
	privAdmitted       = 1 << iota // the request passed the gate and must Leave it
	privZeroesOnWorker             // ring write-zeroes refused: zero on a worker
)

// originalHandler serves a filtered device: reads and flushes go straight
// to the backing device; writes, discards and write-zeroes pass the gate
// (so that a take can pause them) and then the COW engine, which copies the
// chunks they touch into the snapshot before they change the original.
type originalHandler struct {
	orig  *cow.Original // the backing device and its current diff area; immutable
	gate  *gate         // admits the data-changing requests; immutable
	track *cbt.Map      // marked by every admitted change, or nil; immutable
	log   *slog.Logger  // immutable
	ring  bool          // backing I/O goes through the ring, on ublk.RegisteredFile(0); immutable
	block bool          // the backing is a block device (fallocate modes differ); immutable
	// direct serves through the page cache what O_DIRECT refuses.
	direct directFallback
	// inline: the backing is memory (storage.File.InMemory): reads,
	// writes and flushes of requests with a buffer are served by plain
	// system calls on the calling goroutine, cheaper than a ring I/O that
	// io_uring would hand to a worker thread; immutable.
	inline bool
	file   *storage.File // the backing when ring is set; immutable
}

// newOriginalHandler returns the handler of a filtered device; track, if
// not nil, records the blocks its requests change. Its device's ublk
// configuration must register backingFiles(orig.Device()).
func newOriginalHandler(orig *cow.Original, g *gate, track *cbt.Map, log *slog.Logger) ublk.Handler {
	h := &originalHandler{orig: orig, gate: g, track: track, log: log}
	if f, ok := orig.Device().(*storage.File); ok {
		h.ring, h.file, h.inline = true, f, f.InMemory()
		h.direct.on = f.DirectIO()
		if st, err := f.Stat(); err == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
			h.block = true
		}
	}
	return h
}

// NewPassthrough returns the handler of a plain pass-through device over
// dev: a filtered device that is in no snapshot (ublksnap dev serve).
func NewPassthrough(dev *storage.File, log *slog.Logger) ublk.Handler {
	return newOriginalHandler(cow.NewOriginal(dev), newGate(), nil, log)
}

// DeviceConfig returns the ublk configuration of a device presenting dev:
// its size and block sizes, with discard and write-zeroes, its data
// descriptor registered for ring I/O, zero copy where the kernel has it.
func DeviceConfig(dev storage.Device, log *slog.Logger) ublk.Config {
	cfg := geometryConfig(dev.Geometry(), log)
	cfg.Files = backingFiles(dev)
	if cfg.Files != nil {
		cfg.IOMode = ublk.IOModeAuto
	}
	cfg.InlineMax = inlineMax(dev)
	return cfg
}

// inlineMax is the largest request of a device over dev served inline
// (ublk.Config.InlineMax): up to 64 KiB for a backing in memory, where a
// ring I/O's hand-off to an io_uring worker costs more than a copy (under
// TCG, 4 KiB reads at QD1: 288 µs inline against 528-774 µs as zero-copy
// ring I/O; 1 MiB reads: 140-160 MiB/s inline, 900-1200 as ring I/O).
func inlineMax(dev storage.Device) int {
	if f, ok := dev.(*storage.File); ok && f.InMemory() {
		return 64 << 10
	}
	return 0
}

// geometryConfig is the ublk configuration of a device of geometry geo,
// in copy mode.
func geometryConfig(geo storage.Geometry, log *slog.Logger) ublk.Config {
	cfg := ublk.DefaultConfig(geo.Size)
	cfg.LogicalBlockSize = max(geo.LogicalBlockSize, storage.SectorSize)
	cfg.PhysicalBlockSize = max(geo.PhysicalBlockSize, cfg.LogicalBlockSize)
	cfg.Discard, cfg.WriteZeroes = true, true
	cfg.Logger = log
	return cfg
}

func (h *originalHandler) Handle(req *ublk.Request) (err error) {
	defer func() {
		if r := recover(); r != nil {
			if req.Private&privAdmitted != 0 {
				req.Private = 0
				h.gate.Leave()
			}
			err = h.panicked(req, r)
		}
	}()
	if !h.ring {
		return h.handleSync(req)
	}
	if req.Private&privZeroesOnWorker != 0 {
		// Back on a worker after the ring refused a write-zeroes: zero
		// the range the slow way, still inside the gate.
		err = storage.WriteZeroes(h.orig.Device(), req.Offset, int64(req.Length))
		h.leave(req)
		return err
	}
	inline := h.inline && req.Buf != nil
	switch req.Op {
	case ublk.OpRead:
		if inline {
			_, err := h.file.ReadAt(req.Buf, req.Offset)
			return err
		}
		req.Read(h.direct.file(req), req.Offset, 0, req.Length, 0)
		return nil
	case ublk.OpFlush:
		if h.inline {
			return h.file.Flush()
		}
		req.Sync(ublk.RegisteredFile(0))
		return nil
	case ublk.OpWrite, ublk.OpDiscard, ublk.OpWriteZeroes:
	default:
		return syscall.EOPNOTSUPP
	}
	if err := h.enter(req); err != nil {
		return err
	}
	n := int64(req.Length)
	if !req.NoWait() {
		if err := h.orig.Prepare(context.Background(), req.Offset, n, false); err != nil {
			h.leave(req)
			return err
		}
		return h.change(req)
	}
	err = h.orig.PrepareAsync(req.Offset, n, h.prepared(req))
	switch {
	case errors.Is(err, cow.ErrPending):
		return ublk.ErrInProgress
	case err != nil:
		h.leave(req)
		return err
	}
	return h.change(req)
}

// preparedFunc is the callback of PrepareAsync for one tag's requests,
// made once per tag (ublk.Request.Tagged).
type preparedFunc struct {
	done func(error)
}

// prepared returns the function that goes on with req once the COW its
// change needs is done: it describes the change and submits it, or fails
// the request.
func (h *originalHandler) prepared(req *ublk.Request) func(error) {
	if p, ok := req.Tagged.(*preparedFunc); ok {
		return p.done
	}
	p := &preparedFunc{done: func(err error) {
		if err != nil {
			h.leave(req)
			req.Complete(err)
			return
		}
		if err := h.change(req); err != nil || len(req.IOs()) == 0 {
			req.Complete(err)
			return
		}
		req.Submit()
	}}
	req.Tagged = p
	return p.done
}

// enter admits a data-changing request through the gate (on the queue
// thread without waiting: a paused gate sends it to a worker) and marks
// its blocks in the change tracking.
func (h *originalHandler) enter(req *ublk.Request) error {
	if req.NoWait() {
		if !h.gate.TryEnter() {
			return ublk.ErrWouldBlock
		}
	} else if err := h.gate.Enter(context.Background()); err != nil {
		return err
	}
	req.Private |= privAdmitted
	// Marked inside the gate: a take switches the map while no change is
	// admitted, so each change counts in the interval it was made in.
	if h.track != nil {
		h.track.Mark(req.Offset, int64(req.Length))
	}
	return nil
}

// leave lets an admitted request out of the gate.
func (h *originalHandler) leave(req *ublk.Request) {
	if req.Private&privAdmitted != 0 {
		req.Private &^= privAdmitted
		h.gate.Leave()
	}
}

// change makes a write whose COW is done on an in-memory backing (and
// lets it out of the gate), or describes its backing I/O.
func (h *originalHandler) change(req *ublk.Request) error {
	if req.Op != ublk.OpWrite || !h.inline || req.Buf == nil {
		h.describeChange(req)
		return nil
	}
	var err error
	if req.Flags&ublk.FlagFUA != 0 {
		_, err = h.file.WriteAtFUA(req.Buf, req.Offset)
	} else {
		_, err = h.file.WriteAt(req.Buf, req.Offset)
	}
	h.leave(req)
	return err
}

// describeChange describes the backing I/O of a write, discard or
// write-zeroes whose COW is done.
func (h *originalHandler) describeChange(req *ublk.Request) {
	f, off, n := h.direct.file(req), req.Offset, int64(req.Length)
	switch {
	case req.Op == ublk.OpWrite:
		req.Write(f, off, 0, req.Length, req.Flags&ublk.FlagFUA != 0)
	case req.Op == ublk.OpDiscard && h.block:
		req.Fallocate(f, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE|unix.FALLOC_FL_NO_HIDE_STALE, off, n)
	case req.Op == ublk.OpDiscard:
		req.Fallocate(f, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	case h.block:
		req.Fallocate(f, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	default:
		// Zeroed and still allocated, on every file system (tmpfs has no
		// FALLOC_FL_ZERO_RANGE): a hole punched, then allocated again.
		req.Fallocate(f, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		req.Fallocate(f, unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
}

// Finish ends a request's ring I/O: an admitted change leaves the gate; a
// discard the backing cannot do succeeds (it is a hint); a write-zeroes it
// cannot do is done on a worker, still admitted; a read or write that
// O_DIRECT refused is issued again through the page cache.
func (h *originalHandler) Finish(req *ublk.Request, err error) error {
	if h.direct.retry(req, err, h.log) {
		req.ClearIO()
		if req.Op == ublk.OpRead {
			req.Read(h.direct.file(req), req.Offset, 0, req.Length, 0)
		} else {
			h.describeChange(req)
		}
		return nil
	}
	unsupported := errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)
	switch {
	case req.Op == ublk.OpDiscard && unsupported:
		err = nil
	case req.Op == ublk.OpWriteZeroes && unsupported:
		req.Private |= privZeroesOnWorker
		return ublk.ErrWouldBlock
	}
	h.leave(req)
	if err != nil {
		return fmt.Errorf("%v of %s: %w", req, h.orig.Device().Name(), err)
	}
	return nil
}

// handleSync serves a request of a device without a descriptor from the
// request's buffer: on the queue thread what needs no waiting, the rest
// answers ErrWouldBlock and runs again on a worker.
func (h *originalHandler) handleSync(req *ublk.Request) error {
	nowait := req.NoWait()
	switch req.Op {
	case ublk.OpRead:
		return h.orig.Read(req.Buf, req.Offset, nowait)
	case ublk.OpFlush:
		if nowait {
			return ublk.ErrWouldBlock
		}
		return h.orig.Flush()
	case ublk.OpWrite, ublk.OpDiscard, ublk.OpWriteZeroes:
	default:
		return syscall.EOPNOTSUPP
	}
	fua := req.Op == ublk.OpWrite && req.Flags&ublk.FlagFUA != 0
	if nowait && (fua || req.Op != ublk.OpWrite) {
		// A durable write waits for the disk; a discard or write-zeroes
		// for the file system or the disk.
		return ublk.ErrWouldBlock
	}
	if err := h.enter(req); err != nil {
		return err
	}
	defer h.leave(req)
	ctx := context.Background()
	switch {
	case fua:
		return h.orig.WriteFUA(ctx, req.Offset, req.Buf, false)
	case req.Op == ublk.OpWrite:
		return h.orig.Write(ctx, req.Offset, req.Buf, nowait)
	case req.Op == ublk.OpDiscard:
		return h.orig.Discard(ctx, req.Offset, int64(req.Length), nowait)
	default:
		return h.orig.WriteZeroes(ctx, req.Offset, int64(req.Length), nowait)
	}
}

// panicked logs a panic while serving req, corrupts the snapshot of the
// device if there is one, and returns the request's EIO.
func (h *originalHandler) panicked(req *ublk.Request, r any) error {
	err := fmt.Errorf("panic serving %v: %v: %w", req, r, syscall.EIO)
	h.log.Error("request panicked; failing it with EIO", "req", req.String(), "panic", r, "stack", string(debug.Stack()))
	if da := h.orig.DiffArea(); da != nil {
		da.Corrupt(err)
	}
	return err
}

// imageHandler serves a snapshot image from its difference area. Writes to
// the image change only the difference storage. Reads of a device whose
// original and storage are files go through the ring: the engine plans
// each chunk's part (cow.ImageReadPlan) as a read of the original, a read
// of the chunk's region, or a copy of a chunk held in memory, and Finish
// plans again on a worker when an original chunk was copied while it was
// read. Everything else runs through the engine on the request's buffer:
// on the queue goroutine when it need not wait, else (ErrWouldBlock) on a
// worker.
type imageHandler struct {
	area  *cow.DiffArea // immutable
	track *cbt.Map      // the change tracking of the image's device, or nil; immutable
	log   *slog.Logger  // immutable
	ring  bool          // reads may go through the ring, the original on ublk.RegisteredFile(0); immutable
	// direct reads through the page cache what O_DIRECT refuses.
	direct directFallback
	// inline: the original is memory (storage.File.InMemory): reads with
	// a buffer are cheaper through the engine on the calling goroutine
	// than as ring I/O that io_uring hands to a worker thread; immutable.
	inline bool
}

// Private words of the image handler's requests.
const (
	privPlanned = 1 << iota // the read was planned: the area is entered until Finish
	privNoRing              // a part of the read cannot be ring I/O: serve it on the buffer
)

// newImageHandler returns the handler of a snapshot image; its changes
// mark both maps of track (this backup and the next copy them). Its
// device's ublk configuration must register backingFiles(area.Original()).
func newImageHandler(area *cow.DiffArea, track *cbt.Map, log *slog.Logger) ublk.Handler {
	f, ok := area.Original().(*storage.File)
	h := &imageHandler{area: area, track: track, log: log, ring: ok, inline: ok && f.InMemory()}
	h.direct.on = ok && f.DirectIO()
	return h
}

// imagePlan is the cow.ImageReadPlan of one tag's reads (made once per
// tag: ublk.Request.Tagged).
type imagePlan struct {
	h   *imageHandler
	req *ublk.Request
}

func (p *imagePlan) ReadFrom(dev storage.Device, off int64, at, n int, stale uint64) {
	switch f, ok := dev.(dataFile); {
	case dev == p.h.area.Original():
		p.req.Read(p.h.direct.file(p.req), off, at, n, stale)
	case ok:
		p.req.Read(ublk.PlainFile(f.DataFD()), off, at, n, stale)
	default:
		p.req.Private |= privNoRing
	}
}

func (p *imagePlan) Fill(b []byte, at int) error { return p.req.CopyIn(b, at) }

// plan returns req's imagePlan.
func (h *imageHandler) plan(req *ublk.Request) *imagePlan {
	p, ok := req.Tagged.(*imagePlan)
	if !ok {
		p = &imagePlan{h: h, req: req}
		req.Tagged = p
	}
	return p
}

func (h *imageHandler) Handle(req *ublk.Request) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic serving %v: %v: %w", req, r, syscall.EIO)
			h.log.Error("image request panicked; the snapshot is corrupted", "req", req.String(), "panic", r, "stack", string(debug.Stack()))
			h.area.Corrupt(err)
		}
	}()
	ctx, nowait := context.Background(), req.NoWait()
	if req.Op == ublk.OpRead && h.ring && (req.Buf == nil || !h.inline) && req.Private&privNoRing == 0 {
		if err := h.area.BeginImageRead(ctx, req.Offset, req.Length, h.plan(req), nowait); err != nil {
			req.ClearIO()
			return err
		}
		switch {
		case len(req.IOs()) > 0:
			req.Private |= privPlanned
			return nil
		case req.Private&privNoRing == 0:
			return h.area.EndImageRead() // all of it was in memory
		}
		// Nothing for the ring and a part it cannot do: the engine
		// serves the whole read, below.
		if err := h.area.EndImageRead(); err != nil {
			return err
		}
	}
	if req.Buf == nil && (req.Op == ublk.OpRead || req.Op == ublk.OpWrite) {
		// Zero copy without USER_COPY, or a storage without descriptors:
		// a configuration the daemon never makes.
		return fmt.Errorf("%v of the image of %s: no buffer for the engine: %w", req, h.area.Name(), syscall.EIO)
	}
	// Marked before the change, and so also when the change fails (it
	// may have been applied in part), and again when a nowait attempt is
	// retried: marking is idempotent.
	if h.track != nil && req.Op != ublk.OpRead && req.Op != ublk.OpFlush {
		h.track.MarkBoth(req.Offset, int64(req.Length))
	}
	switch req.Op {
	case ublk.OpRead:
		return h.area.ReadImage(ctx, req.Buf, req.Offset, nowait)
	case ublk.OpWrite:
		return h.area.WriteImage(ctx, req.Buf, req.Offset, nowait)
	case ublk.OpWriteZeroes:
		return h.area.WriteZeroesImage(ctx, req.Offset, int64(req.Length), nowait)
	case ublk.OpDiscard:
		return h.area.DiscardImage(req.Offset, int64(req.Length))
	case ublk.OpFlush:
		// The difference storage lives only as long as the snapshot: there
		// is nothing to make durable beyond what the image's reads see.
		if corrupted, _ := h.area.Corrupted(); corrupted {
			return syscall.EIO
		}
		return nil
	}
	return syscall.EOPNOTSUPP
}

// Finish ends a planned read: a part that could not be ring I/O, an
// original chunk copied while it was read (the chunk then comes from the
// difference storage), or a read of the original that O_DIRECT refused
// (it then goes through the page cache) sends the read to a worker to be
// planned and served again.
func (h *imageHandler) Finish(req *ublk.Request, err error) error {
	if req.Private&privPlanned == 0 {
		return err
	}
	req.Private &^= privPlanned
	again := req.Private&privNoRing != 0
	for _, io := range req.IOs() {
		again = again || h.area.OriginalReadStale(io.Cookie)
	}
	if endErr := h.area.EndImageRead(); err == nil {
		err = endErr
	}
	if h.direct.retry(req, err, h.log) {
		again, err = true, nil
	}
	switch {
	case err != nil:
		return fmt.Errorf("%v of the image of %s: %w", req, h.area.Name(), err)
	case again:
		return ublk.ErrWouldBlock
	}
	return nil
}
