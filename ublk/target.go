package ublk

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
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
// A handler serves a request in one of three ways:
//
//   - It describes the backing I/O (Request.Read, Write, Sync, Fallocate)
//     and returns nil: the queue issues it as SQEs on its own ring (what
//     would block is the kernel's business: io_uring hands it to its
//     workers), resubmits short transfers for the rest, and commits all
//     Length bytes (0 for the other ops) or the first error. A handler that
//     also implements Finisher sees the outcome first.
//   - It returns nil with no I/O described (done), or an error (failed).
//   - It takes the request (returns ErrInProgress) and later, from any
//     goroutine, calls Request.Complete, or describes I/O and calls
//     Request.Submit; or it returns ErrWouldBlock to be called again on a
//     worker goroutine.
//
// Any other error fails the request; an error that wraps a syscall.Errno
// is passed to the block layer as that errno, anything else as EIO.
//
// Handle must not retain req.Buf after the request is completed.
type Handler interface {
	Handle(req *Request) error
}

// Finisher is implemented by a Handler that must see the outcome of the
// I/O it described before the request completes (to release what it holds,
// or to check that what was read is still right). Finish runs on the queue
// goroutine and must not block; err is nil or the first failed I/O's
// error. Its result is the request's, with the meanings Handle's have: nil
// with new I/O described issues that I/O, ErrWouldBlock sends the request
// to a worker's Handle (with the I/O cleared), ErrInProgress keeps it.
type Finisher interface {
	Finish(req *Request, err error) error
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
	// Buf is the request's data buffer (len == Length) for OpRead and
	// OpWrite in copy and user copy mode, and nil otherwise (under zero
	// copy the data never enters this process). It is valid only until
	// completion.
	Buf []byte
	// Private is the handler's own word about the request (what it holds,
	// which step it is at); zero when the request arrives.
	Private uint64
	// Tagged is the handler's own per-tag object: kept across the
	// requests of the tag (nil at first), so that what a handler needs
	// for every request (a callback bound to it) is allocated once.
	Tagged any

	q      *queue      // owning queue; nil for a request of NewRequest
	tag    uint16      // ublk tag; immutable
	done   func(error) // Complete's callback for a request of NewRequest
	noWait bool        // set by the dispatcher before each Handle call
	// submitted: Submit (not Complete) ended the handler's hold of a
	// request of NewRequest; read by Run.
	submitted bool
	state     atomic.Uint32 // reqIdle, reqBusy (taken by the handler), reqDone, reqIO
	// ios is the backing I/O described by the handler, in order; its
	// backing array is reused by later requests of the tag. Owned by
	// whoever holds the request (handler, then the queue goroutine).
	ios []IO
	// Issue state, owned by the queue goroutine: ios[next:] are not
	// issued yet, inflight SQEs are in the ring, ioErr is the first error.
	next     int
	inflight int
	ioErr    int32
	// poolBuf is the user-copy pool buffer Buf is cut from, or nil; owned
	// by the queue goroutine.
	poolBuf []byte
}

// File names a file that backing I/O goes to: one of Config.Files,
// registered on every queue ring, or a plain descriptor.
type File struct {
	fd    int32 // registered index, or descriptor
	fixed bool  // fd is an index into Config.Files
}

// RegisteredFile names Config.Files[i].
func RegisteredFile(i int) File { return File{fd: int32(i), fixed: true} }

// PlainFile names descriptor fd, not registered (slower: the kernel looks
// it up for every SQE).
func PlainFile(fd int) File { return File{fd: int32(fd)} }

// ioKind is what one IO does.
type ioKind uint8

const (
	ioRead      ioKind = iota // file -> request data
	ioWrite                   // request data -> file
	ioSync                    // fdatasync
	ioFallocate               // fallocate(mode, off, len)
)

// IO is one piece of backing I/O of a request, as the handler described
// it.
type IO struct {
	kind ioKind
	// After makes this IO wait until every IO before it completed (a
	// barrier); otherwise IOs are issued together.
	after bool
	dsync bool   // a write made durable by itself (RWF_DSYNC)
	mode  uint32 // fallocate mode
	file  File
	off   int64 // file offset
	at    int   // offset in the request's data (read and write)
	n     int64 // bytes
	done  int64 // bytes transferred so far (short transfers)
	// Cookie is the handler's note about this IO (Finish can read it back
	// with Request.IOs).
	Cookie uint64
}

// Data reports the file, file offset, offset in the request's data and
// length of a read or write.
func (io *IO) Data() (f File, off int64, at, n int) { return io.file, io.off, io.at, int(io.n) }

// IsRead reports whether io reads from its file into the request.
func (io *IO) IsRead() bool { return io.kind == ioRead }

// add appends an IO, reusing the tag's array.
func (r *Request) add(io IO) *IO {
	r.ios = append(r.ios, io)
	return &r.ios[len(r.ios)-1]
}

// Read describes a read of n bytes of f at off into the request's data at
// byte at. cookie is the handler's note (see IO.Cookie). A read without a
// cookie that continues the previous one (the same file, the next bytes
// of both the file and the request) extends it: one SQE instead of two.
func (r *Request) Read(f File, off int64, at, n int, cookie uint64) {
	if k := len(r.ios); k > 0 && cookie == 0 {
		if last := &r.ios[k-1]; last.kind == ioRead && last.file == f && last.Cookie == 0 &&
			last.off+last.n == off && int64(last.at)+last.n == int64(at) {
			last.n += int64(n)
			return
		}
	}
	r.add(IO{kind: ioRead, file: f, off: off, at: at, n: int64(n), Cookie: cookie})
}

// Write describes a write of the request's data at byte at, n bytes, to f
// at off; dsync makes this write durable by itself (FUA).
func (r *Request) Write(f File, off int64, at, n int, dsync bool) {
	r.add(IO{kind: ioWrite, file: f, off: off, at: at, n: int64(n), dsync: dsync})
}

// Sync describes an fdatasync of f, issued after the IOs before it.
func (r *Request) Sync(f File) {
	r.add(IO{kind: ioSync, file: f, after: true})
}

// Fallocate describes fallocate(f, mode, off, n), issued after the IOs
// before it (so that a punch and an allocation run in order).
func (r *Request) Fallocate(f File, mode uint32, off, n int64) {
	r.add(IO{kind: ioFallocate, file: f, mode: mode, off: off, n: n, after: true})
}

// CopyIn puts p into the data of a READ at byte at: a copy into Buf, or in
// zero copy a write through /dev/ublkcN (UBLK_F_USER_COPY, negotiated with
// Config.WriteData). Whoever holds the request may call it, on any
// goroutine.
func (r *Request) CopyIn(p []byte, at int) error {
	switch {
	case at < 0 || at+len(p) > r.Length:
		return fmt.Errorf("ublk: %v: %d bytes at %d: %w", r, len(p), at, syscall.EINVAL)
	case r.Buf != nil:
		copy(r.Buf[at:], p)
		return nil
	case r.q == nil || !r.q.userCopy:
		return fmt.Errorf("ublk: %v: no buffer and no user copy (Config.WriteData): %w", r, syscall.EOPNOTSUPP)
	}
	n, err := unix.Pwrite(r.q.cdevFd, p, userCopyPos(r.q.id, r.tag)+int64(at))
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("ublk: %v: copy %d bytes at %d to the kernel: %w", r, len(p), at, err)
	}
	return nil
}

// IOs returns the I/O described for the request (for Finish).
func (r *Request) IOs() []IO { return r.ios }

// ClearIO forgets the I/O described so far.
func (r *Request) ClearIO() {
	clear(r.ios)
	r.ios = r.ios[:0]
	r.next = 0
}

// Submit issues the I/O described for a request the handler took
// (ErrInProgress), from any goroutine, exactly once instead of Complete.
// Without I/O described it completes the request successfully.
func (r *Request) Submit() {
	if !r.state.CompareAndSwap(reqBusy, reqDone) {
		if r.q != nil {
			r.q.log.Error("ublk: Submit called on a request that is not in progress", "req", r.String())
		}
		return
	}
	if r.q == nil {
		r.submitted = true
		r.done(nil)
		return
	}
	r.q.enqueue(completion{tag: r.tag, submit: true})
}

// Request states, for the exactly-once check of Complete.
const (
	reqIdle = iota // waiting for the kernel
	reqBusy        // handed to the Handler
	reqDone        // completion recorded, commit pending
	reqIO          // its backing I/O is in the queue's ring
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
	r.q.enqueue(completion{tag: r.tag, result: r.result(err)})
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
