package cow

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"github.com/ublksnap/ublksnap/storage"
)

// writeOp is a request that changes data on the original.
type writeOp uint8

const (
	opWrite       writeOp = iota // write a buffer
	opWriteFUA                   // write a buffer durably (forced unit access)
	opDiscard                    // discard a range
	opWriteZeroes                // zero a range
)

func (op writeOp) String() string {
	return [...]string{"write", "FUA write", "discard", "write zeroes"}[op]
}

// Original is an original device seen through the chunk engine: every
// request that changes data (write, discard, write-zeroes) first lets the
// current DiffArea copy the chunks it touches. It is the object a ublk
// handler for the original device calls:
//
//	case ublk.OpWrite:
//		err := orig.WriteAsync(req.Offset, req.Buf, req.Complete)
//		if errors.Is(err, cow.ErrPending) {
//			return ublk.ErrInProgress
//		}
//		return err
//
// or, for a handler that prefers the package's blocking workers,
// orig.Write(ctx, req.Offset, req.Buf, req.NoWait()), whose ErrWouldBlock
// matches syscall.EAGAIN and so is ublk's would-block answer.
//
// Original never fails a request because of snapshot trouble: a failure of
// the COW machinery corrupts the snapshot and the request proceeds.
type Original struct {
	dev  storage.Device           // the device; immutable
	area atomic.Pointer[DiffArea] // the snapshot's difference area, or nil
}

// NewOriginal returns dev without a snapshot.
func NewOriginal(dev storage.Device) *Original { return &Original{dev: dev} }

// Device returns the underlying device.
func (o *Original) Device() storage.Device { return o.dev }

// DiffArea returns the current difference area, or nil.
func (o *Original) DiffArea() *DiffArea { return o.area.Load() }

// SetDiffArea installs da (nil: none) and returns the previous one, which
// the caller closes. It must be called while no data-changing request is in
// flight (the daemon pauses the device to take a snapshot): a request that
// already passed COW without an area would change the original unseen.
func (o *Original) SetDiffArea(da *DiffArea) *DiffArea { return o.area.Swap(da) }

// Read reads len(p) bytes at off; reads of the original never involve the
// snapshot. With nowait set it reads only what needs no waiting (the page
// cache) and answers ErrWouldBlock (syscall.EAGAIN) otherwise.
func (o *Original) Read(p []byte, off int64, nowait bool) error {
	var err error
	if nowait {
		err = storage.ReadNoWait(o.dev, p, off)
		if errors.Is(err, storage.ErrWouldBlock) {
			return ErrWouldBlock
		}
	} else {
		_, err = o.dev.ReadAt(p, off)
	}
	if err != nil {
		return fmt.Errorf("read %s at %d: %w", o.dev.Name(), off, err)
	}
	return nil
}

// Flush flushes the device.
func (o *Original) Flush() error { return storage.Flush(o.dev) }

// Write writes p at off after the copy-on-write of the chunks it touches.
// With nowait set it never blocks on the snapshot: it answers ErrWouldBlock,
// having changed nothing, when a chunk would need loading, and the caller
// retries with nowait false from a goroutine that may block. Write fails
// with ctx.Err() without writing when ctx ends while it waits.
func (o *Original) Write(ctx context.Context, off int64, p []byte, nowait bool) error {
	return o.submit(ctx, opWrite, off, int64(len(p)), p, nowait)
}

// WriteFUA is Write made durable by itself when it returns (forced unit
// access): only this write, not everything written before.
func (o *Original) WriteFUA(ctx context.Context, off int64, p []byte, nowait bool) error {
	return o.submit(ctx, opWriteFUA, off, int64(len(p)), p, nowait)
}

// Discard discards n bytes at off, like Write: the chunks are copied first.
func (o *Original) Discard(ctx context.Context, off, n int64, nowait bool) error {
	return o.submit(ctx, opDiscard, off, n, nil, nowait)
}

// WriteZeroes zeroes n bytes at off, like Write.
func (o *Original) WriteZeroes(ctx context.Context, off, n int64, nowait bool) error {
	return o.submit(ctx, opWriteZeroes, off, n, nil, nowait)
}

// WriteAsync is Write for a caller that must not block, such as the ublk
// queue goroutine. When no chunk needs loading it writes at once and
// returns the result (nil or an error), and done is not called. Otherwise
// it returns ErrPending at once and a worker goroutine does the COW (loading
// the chunks, postponing the write until all are in memory) and the write,
// then calls done with the result. p must stay valid until then.
func (o *Original) WriteAsync(off int64, p []byte, done func(error)) error {
	return o.async(opWrite, off, int64(len(p)), p, done)
}

// DiscardAsync is Discard in the manner of WriteAsync.
func (o *Original) DiscardAsync(off, n int64, done func(error)) error {
	return o.async(opDiscard, off, n, nil, done)
}

// WriteZeroesAsync is WriteZeroes in the manner of WriteAsync.
func (o *Original) WriteZeroesAsync(off, n int64, done func(error)) error {
	return o.async(opWriteZeroes, off, n, nil, done)
}

// async tries the request without blocking and hands it to a worker of
// the diff area if that would block.
func (o *Original) async(op writeOp, off, n int64, p []byte, done func(error)) error {
	err := o.submit(context.Background(), op, off, n, p, true)
	if !errors.Is(err, ErrWouldBlock) {
		return err
	}
	o.handOff(asyncJob{o: o, op: op, off: off, n: n, p: p, change: true, done: done})
	return ErrPending
}

// asyncJob is a data-changing request whose COW must wait, handed from
// the caller that must not block to a worker (DiffArea.runAsync).
type asyncJob struct {
	o      *Original
	op     writeOp
	off, n int64
	p      []byte      // the data of a write
	change bool        // make the change after the COW (WriteAsync), not only the COW (PrepareAsync)
	done   func(error) // called with the result
}

// run does the job and calls done. A panic fails only this request (EIO)
// and corrupts the snapshot, if there is one: the process and every other
// device go on.
func (j asyncJob) run() {
	defer func() {
		if r := recover(); r != nil {
			err := fmt.Errorf("%v %s [%d+%d]: panic: %v: %w", j.op, j.o.dev.Name(), j.off, j.n, r, syscall.EIO)
			if da := j.o.area.Load(); da != nil {
				da.Corrupt(err)
			}
			j.done(err)
		}
	}()
	if j.change {
		j.done(j.o.submit(context.Background(), j.op, j.off, j.n, j.p, false))
	} else {
		j.done(j.o.prepare(context.Background(), j.op, j.off, j.n, false))
	}
}

// handOff runs j on a worker of the current diff area (a goroutine of its
// own if there is none).
func (o *Original) handOff(j asyncJob) {
	if da := o.area.Load(); da != nil {
		da.runAsync(j)
		return
	}
	go j.run()
}

// Prepare does the copy-on-write for a change of n bytes at off that the
// caller then makes itself (as backing I/O of its own): when it returns nil
// no chunk of the range needs copying any more. With nowait set it never
// blocks and answers ErrWouldBlock, having copied nothing, when a chunk
// must be loaded. It fails with ctx.Err() if ctx ends while it waits (the
// change must then not be made) and with EINVAL for a range beyond the
// device; snapshot trouble never fails it (it corrupts the snapshot).
//
// The caller must make the change before anything else can switch the
// device's diff area (the daemon's gate guarantees it: it pauses the
// device's changes around every switch).
func (o *Original) Prepare(ctx context.Context, off, n int64, nowait bool) error {
	return o.prepare(ctx, opWrite, off, n, nowait)
}

// PrepareAsync is Prepare for a caller that must not block: it returns nil
// when nothing needs copying, or ErrPending at once and copies on a worker
// goroutine, which then calls done (with nil: the change may be made).
func (o *Original) PrepareAsync(off, n int64, done func(error)) error {
	err := o.prepare(context.Background(), opWrite, off, n, true)
	if !errors.Is(err, ErrWouldBlock) {
		return err
	}
	o.handOff(asyncJob{o: o, op: opWrite, off: off, n: n, done: done})
	return ErrPending
}

// prepare checks the range and does the COW of a request of kind op.
func (o *Original) prepare(ctx context.Context, op writeOp, off, n int64, nowait bool) error {
	size := o.dev.Geometry().Size
	if off < 0 || n < 0 || off+n > size {
		return fmt.Errorf("%v %s [%d+%d]: beyond the %d-byte device: %w", op, o.dev.Name(), off, n, size, syscall.EINVAL)
	}
	da := o.area.Load()
	if da == nil || !da.enter() {
		return nil
	}
	defer da.leave()
	if nowait {
		return da.cowNoWait(off, n)
	}
	return da.cow(ctx, off, n)
}

// submit does the COW for a data-changing request and then the request.
func (o *Original) submit(ctx context.Context, op writeOp, off, n int64, p []byte, nowait bool) error {
	if err := o.prepare(ctx, op, off, n, nowait); err != nil {
		return err
	}
	var err error
	switch op {
	case opWrite:
		_, err = o.dev.WriteAt(p, off)
	case opWriteFUA:
		err = storage.WriteFUA(o.dev, p, off)
	case opDiscard:
		err = storage.Discard(o.dev, off, n)
	case opWriteZeroes:
		err = storage.WriteZeroes(o.dev, off, n)
	}
	if err != nil {
		return fmt.Errorf("%v %s [%d+%d]: %w", op, o.dev.Name(), off, n, err)
	}
	return nil
}
