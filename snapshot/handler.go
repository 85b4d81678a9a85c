package snapshot

import (
	"context"
	"errors"
	"syscall"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/ublk"
)

// originalHandler serves a filtered device: reads and flushes go straight
// to the backing device; writes, discards and write-zeroes pass the gate
// (so that a take can pause them) and then the COW engine, which copies the
// chunks they touch into the snapshot before they change the original.
type originalHandler struct {
	orig *cow.Original // the backing device and its current diff area
	gate *gate         // admits the data-changing requests
}

func (h *originalHandler) Handle(req *ublk.Request) error {
	switch req.Op {
	case ublk.OpRead:
		return h.orig.Read(req.Buf, req.Offset)
	case ublk.OpFlush:
		return h.orig.Flush()
	case ublk.OpWrite, ublk.OpDiscard, ublk.OpWriteZeroes:
	default:
		return syscall.EOPNOTSUPP
	}
	if req.NoWait() {
		if !h.gate.TryEnter() {
			return ublk.ErrWouldBlock
		}
	} else if err := h.gate.Enter(context.Background()); err != nil {
		return err
	}
	fua := req.Flags&ublk.FlagFUA != 0
	finish := func(err error) error {
		h.gate.Leave()
		if err == nil && fua {
			err = h.orig.Flush()
		}
		return err
	}
	done := func(err error) { req.Complete(finish(err)) }
	var err error
	switch req.Op {
	case ublk.OpWrite:
		err = h.orig.WriteAsync(req.Offset, req.Buf, done)
	case ublk.OpDiscard:
		err = h.orig.DiscardAsync(req.Offset, int64(req.Length), done)
	default:
		err = h.orig.WriteZeroesAsync(req.Offset, int64(req.Length), done)
	}
	if errors.Is(err, cow.ErrPending) {
		return ublk.ErrInProgress
	}
	return finish(err)
}

// newOriginalHandler returns the handler of a filtered device.
func newOriginalHandler(orig *cow.Original, g *gate) ublk.Handler {
	return &originalHandler{orig: orig, gate: g}
}

// newImageHandler returns the handler of a snapshot image.
func newImageHandler(area *cow.DiffArea) ublk.Handler { return &imageHandler{area: area} }

// imageHandler serves a snapshot image from its difference area. Writes to
// the image change only the difference storage. The engine answers
// ErrWouldBlock (EAGAIN) on the queue goroutine whenever it would wait, and
// the ublk package then retries on a worker.
type imageHandler struct {
	area *cow.DiffArea
}

func (h *imageHandler) Handle(req *ublk.Request) error {
	ctx, nowait := context.Background(), req.NoWait()
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
