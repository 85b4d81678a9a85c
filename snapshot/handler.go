package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"syscall"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// The handlers follow ublk's contract: on the queue thread (NoWait) they
// never block. What may wait answers ublk.ErrWouldBlock there and runs
// again on a worker: reads not in the page cache (tried with RWF_NOWAIT
// first), flushes, FUA writes, discards and write-zeroes of the filtered
// device (fallocate, BLKDISCARD, BLKZEROOUT: file system and disk work,
// up to 1 GiB per request), COW loads, and image I/O that needs the
// difference storage. A panic while serving a request fails only that
// request with EIO and corrupts the snapshot involved; every other device
// goes on.

// originalHandler serves a filtered device: reads and flushes go straight
// to the backing device; writes, discards and write-zeroes pass the gate
// (so that a take can pause them) and then the COW engine, which copies the
// chunks they touch into the snapshot before they change the original.
type originalHandler struct {
	orig  *cow.Original // the backing device and its current diff area; immutable
	gate  *gate         // admits the data-changing requests; immutable
	track *cbt.Map      // marked by every admitted change, or nil; immutable
	log   *slog.Logger  // immutable
}

// newOriginalHandler returns the handler of a filtered device; track, if
// not nil, records the blocks its requests change.
func newOriginalHandler(orig *cow.Original, g *gate, track *cbt.Map, log *slog.Logger) ublk.Handler {
	return &originalHandler{orig: orig, gate: g, track: track, log: log}
}

// NewPassthrough returns the handler of a plain pass-through device over
// dev: a filtered device that is in no snapshot (ublksnap dev serve).
func NewPassthrough(dev *storage.File, log *slog.Logger) ublk.Handler {
	return newOriginalHandler(cow.NewOriginal(dev), newGate(), nil, log)
}

// DeviceConfig returns the ublk configuration of a device presenting a
// backing of geometry geo: its size and block sizes, with discard and
// write-zeroes.
func DeviceConfig(geo storage.Geometry, log *slog.Logger) ublk.Config {
	cfg := ublk.DefaultConfig(geo.Size)
	cfg.LogicalBlockSize = max(geo.LogicalBlockSize, storage.SectorSize)
	cfg.PhysicalBlockSize = max(geo.PhysicalBlockSize, cfg.LogicalBlockSize)
	cfg.Discard, cfg.WriteZeroes = true, true
	cfg.Logger = log
	return cfg
}

func (h *originalHandler) Handle(req *ublk.Request) (err error) {
	entered := false
	defer func() {
		if r := recover(); r != nil {
			if entered {
				h.gate.Leave()
			}
			err = h.panicked(req, r)
		}
	}()
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
	if nowait {
		if !h.gate.TryEnter() {
			return ublk.ErrWouldBlock
		}
	} else if err := h.gate.Enter(context.Background()); err != nil {
		return err
	}
	entered = true
	// Marked inside the gate: a take switches the map while no change is
	// admitted, so each change counts in the interval it was made in.
	if h.track != nil {
		h.track.Mark(req.Offset, int64(req.Length))
	}
	if fua {
		err = h.orig.WriteFUA(context.Background(), req.Offset, req.Buf, false)
		h.gate.Leave() // not deferred: the recover above leaves on a panic
		return err
	}
	// Try at once: no COW needed (no snapshot, or its chunks copied) is
	// the common case and costs nothing more. Only a request that must wait
	// for a chunk gets a per-request completion and a goroutine.
	if err = h.change(req, true); !errors.Is(err, cow.ErrWouldBlock) {
		h.gate.Leave()
		return err
	}
	p := &pendingChange{h: h, req: req}
	switch req.Op {
	case ublk.OpWrite:
		err = h.orig.WriteAsync(req.Offset, req.Buf, p.done)
	case ublk.OpDiscard:
		err = h.orig.DiscardAsync(req.Offset, int64(req.Length), p.done)
	default:
		err = h.orig.WriteZeroesAsync(req.Offset, int64(req.Length), p.done)
	}
	if errors.Is(err, cow.ErrPending) {
		return ublk.ErrInProgress
	}
	h.gate.Leave()
	return err
}

// change does a write, discard or write-zeroes of req through the COW
// engine; with nowait it answers cow.ErrWouldBlock, having changed nothing,
// when a chunk must be loaded first.
func (h *originalHandler) change(req *ublk.Request, nowait bool) error {
	ctx := context.Background()
	switch req.Op {
	case ublk.OpWrite:
		return h.orig.Write(ctx, req.Offset, req.Buf, nowait)
	case ublk.OpDiscard:
		return h.orig.Discard(ctx, req.Offset, int64(req.Length), nowait)
	default:
		return h.orig.WriteZeroes(ctx, req.Offset, int64(req.Length), nowait)
	}
}

// pendingChange is a data-changing request waiting for the COW of its
// chunks on a goroutine of the engine.
type pendingChange struct {
	h   *originalHandler // the device's handler; immutable
	req *ublk.Request    // the request, admitted by h.gate; immutable
}

// done lets the request out of the gate and completes it.
func (p *pendingChange) done(err error) {
	p.h.gate.Leave()
	p.req.Complete(err)
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
// the image change only the difference storage. The engine answers
// ErrWouldBlock (EAGAIN) on the queue goroutine whenever it would wait, and
// the ublk package then retries on a worker.
type imageHandler struct {
	area  *cow.DiffArea // immutable
	track *cbt.Map      // the change tracking of the image's device, or nil; immutable
	log   *slog.Logger  // immutable
}

// newImageHandler returns the handler of a snapshot image; its changes
// mark both maps of track (this backup and the next copy them).
func newImageHandler(area *cow.DiffArea, track *cbt.Map, log *slog.Logger) ublk.Handler {
	return &imageHandler{area: area, track: track, log: log}
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
