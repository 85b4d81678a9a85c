package ublk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
)

// Op is the operation of a block request.
type Op uint8

// Operations delivered to a Handler. FLUSH arrives only when
// Config.VolatileCache is set, DISCARD only with Config.Discard and
// WRITE_ZEROES only with Config.WriteZeroes.
const (
	OpRead        Op = iota // fill Buf from the device at Offset
	OpWrite                 // store Buf at Offset
	OpFlush                 // make all completed writes durable
	OpDiscard               // the range's contents may be dropped
	OpWriteZeroes           // the range must read back as zeros
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpFlush:
		return "flush"
	case OpDiscard:
		return "discard"
	case OpWriteZeroes:
		return "write-zeroes"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Flags modify a request.
type Flags uint32

const (
	// FlagFUA asks that a write be durable when it completes (forced unit
	// access). Only delivered when Config.FUA and Config.VolatileCache are set.
	FlagFUA Flags = 1 << iota
	// FlagNoUnmap on a WRITE_ZEROES asks to keep the range allocated (no
	// hole punching).
	FlagNoUnmap
)

// Sentinel errors of the package.
var (
	// ErrWouldBlock is returned by Handle, for a request whose NoWait is
	// true, when serving it would block. The package then runs Handle again
	// for the same request on a worker goroutine, with NoWait false. It may
	// be wrapped, and syscall.EAGAIN from a NoWait call is treated the same.
	ErrWouldBlock = errors.New("ublk: operation would block")
	// ErrInProgress is returned by Handle when it has taken the request and
	// will finish it later with Request.Complete.
	ErrInProgress = errors.New("ublk: request in progress")
	// ErrInvalidConfig is wrapped by every Config.Validate error.
	ErrInvalidConfig = errors.New("ublk: invalid config")
	// ErrClosed is returned by operations on a device that was closed.
	ErrClosed = errors.New("ublk: device closed")
	// ErrNotSupported is returned when the kernel's ublk lacks a feature
	// the configuration asks for.
	ErrNotSupported = errors.New("ublk: not supported by this kernel")
	// ErrNotRecoverable is returned by Recover for a device that is not
	// waiting for a new server (not recoverable, live, or not the owner's).
	ErrNotRecoverable = errors.New("ublk: device cannot be recovered")
	// ErrNoUblk means the kernel has no ublk driver (no /dev/ublk-control).
	ErrNoUblk = errors.New("ublk: /dev/ublk-control not available (is ublk_drv loaded?)")
)

// Handler serves block requests. Handle is called on the queue goroutine
// with NoWait true (and must then not block: it returns ErrWouldBlock
// instead), or on a worker goroutine with NoWait false. Calls for different
// requests may run concurrently, on several queues and workers; requests in
// flight never overlap unless the block layer sends overlapping ones, which
// it may: a Handler must not assume any ordering between in-flight requests.
//
// Handle returns nil when the request is done (all Length bytes for READ
// and WRITE), ErrInProgress when it will call req.Complete later, or
// ErrWouldBlock (see there). Any other error fails the request; an error
// that wraps a syscall.Errno is passed to the block layer as that errno,
// anything else as EIO.
//
// Handle must not retain req.Buf after the request is completed.
type Handler interface {
	Handle(req *Request) error
}

// HandlerFunc adapts a function to the Handler interface.
type HandlerFunc func(req *Request) error

// Handle calls f(req).
func (f HandlerFunc) Handle(req *Request) error { return f(req) }

// Request is one block request. The package reuses a Request for later
// requests of the same tag once it has completed, so a Handler must not touch
// it after Handle returned nil or an error, or after calling Complete.
type Request struct {
	Op     Op    // what to do
	Flags  Flags // FUA, NOUNMAP
	Offset int64 // byte offset on the device
	Length int   // byte count
	// Buf aliases the tag's I/O buffer (len == Length) for OpRead and
	// OpWrite and is nil otherwise. It is valid only until completion.
	Buf []byte

	q      *queue        // owning queue; nil for a request of NewRequest
	tag    uint16        // ublk tag; immutable
	done   func(error)   // Complete's callback for a request of NewRequest
	noWait bool          // set by the dispatcher before each Handle call
	state  atomic.Uint32 // reqIdle, reqBusy (taken by the handler), reqDone
}

// Request states, for the exactly-once check of Complete.
const (
	reqIdle = iota // waiting for the kernel
	reqBusy        // handed to the Handler
	reqDone        // completion recorded, commit pending
)

// NoWait reports whether Handle runs on the queue goroutine and must not
// block.
func (r *Request) NoWait() bool { return r.noWait }

// Tag returns the request's ublk queue and tag (for logging and tests).
func (r *Request) Tag() (queueID, tag int) {
	if r.q == nil {
		return -1, int(r.tag)
	}
	return int(r.q.id), int(r.tag)
}

func (r *Request) String() string {
	q := -1
	if r.q != nil {
		q = int(r.q.id)
	}
	return fmt.Sprintf("%s off=%d len=%d flags=%#x (q%d tag %d)", r.Op, r.Offset, r.Length, uint32(r.Flags), q, r.tag)
}

// Complete finishes a request whose Handle returned ErrInProgress. It may
// be called from any goroutine, exactly once; err nil means all Length bytes
// were done. The commit to the kernel happens on the queue's own thread,
// which Complete wakes up.
func (r *Request) Complete(err error) {
	if !r.state.CompareAndSwap(reqBusy, reqDone) {
		if r.q != nil {
			r.q.log.Error("ublk: Complete called on a request that is not in progress", "req", r.String())
		}
		return
	}
	if r.q == nil {
		r.done(err)
		return
	}
	r.q.complete(r.tag, r.result(err))
}

// NewRequest returns a request that belongs to no device, to run a Handler
// outside a queue (in tests): Handle it as the queue would, with NoWait as
// given; Complete calls done. Buf is used as the request's data.
func NewRequest(op Op, flags Flags, off int64, length int, buf []byte, noWait bool, done func(error)) *Request {
	r := &Request{Op: op, Flags: flags, Offset: off, Length: length, Buf: buf, noWait: noWait, done: done}
	r.state.Store(reqBusy)
	return r
}

// result maps a Handler outcome to the COMMIT result: bytes for READ/WRITE,
// 0 for the others, or a negative errno.
func (r *Request) result(err error) int32 {
	if err == nil {
		if r.Op == OpRead || r.Op == OpWrite {
			return int32(r.Length)
		}
		return 0
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return -int32(errno)
	}
	return -int32(syscall.EIO)
}

// isWouldBlock reports whether err asks for a retry on a worker.
func isWouldBlock(err error) bool {
	return errors.Is(err, ErrWouldBlock) || errors.Is(err, syscall.EAGAIN)
}
