// Package uring is a minimal io_uring binding on golang.org/x/sys/unix, just
// large enough for a ublk server: ring setup with 64- or 128-byte SQEs,
// submission and completion with the memory ordering the kernel expects, and
// helpers that fill SQEs for URING_CMD, READ, WRITE, FSYNC, FALLOCATE,
// POLL_ADD, ASYNC_CANCEL and NOP.
//
// # Memory model
//
// The SQ and CQ rings are shared with the kernel through three mmaps:
//
//	SQ ring  IORING_OFF_SQ_RING  head, tail, mask, flags, index array
//	CQ ring  IORING_OFF_CQ_RING  head, tail, mask, CQE array (16 bytes each)
//	SQEs     IORING_OFF_SQES     sq_entries × 64 (or 128 with SQE128) bytes
//
// The application owns the SQ tail and the CQ head, the kernel owns the SQ
// head and the CQ tail. An SQE is filled completely before the SQ tail is
// published with an atomic store (release); CQEs are read only after an
// atomic load of the CQ tail (acquire) and released with an atomic store of
// the CQ head. Go's sync/atomic operations are sequentially consistent, which
// is at least as strong as both.
//
// # Concurrency
//
// A Ring is not safe for concurrent use: one goroutine (for a ring created
// with SetupSingleIssuer, one locked OS thread) prepares SQEs, enters the
// kernel and reaps completions. Memory whose address is placed in an SQE
// (buffers, command payloads) must not be Go stack memory and must stay
// alive until the matching CQE has been reaped.
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Setup flags (io_uring_params.flags).
const (
	SetupCQSize       = 1 << 3  // IORING_SETUP_CQSIZE: use Params.CQEntries
	SetupClamp        = 1 << 4  // IORING_SETUP_CLAMP
	SetupSubmitAll    = 1 << 7  // IORING_SETUP_SUBMIT_ALL
	SetupCoopTaskrun  = 1 << 8  // IORING_SETUP_COOP_TASKRUN
	SetupTaskrunFlag  = 1 << 9  // IORING_SETUP_TASKRUN_FLAG
	SetupSQE128       = 1 << 10 // IORING_SETUP_SQE128: 128-byte SQEs (ublk control ring)
	SetupCQE32        = 1 << 11 // IORING_SETUP_CQE32
	SetupSingleIssuer = 1 << 12 // IORING_SETUP_SINGLE_ISSUER
	SetupDeferTaskrun = 1 << 13 // IORING_SETUP_DEFER_TASKRUN (needs SINGLE_ISSUER)
	featExtArg        = 1 << 8  // IORING_FEAT_EXT_ARG
	enterGetEvents    = 1 << 0  // IORING_ENTER_GETEVENTS
	enterExtArg       = 1 << 3  // IORING_ENTER_EXT_ARG
	sqCQOverflow      = 1 << 1  // IORING_SQ_CQ_OVERFLOW
	sqTaskrun         = 1 << 2  // IORING_SQ_TASKRUN
	offSQRing         = 0
	offCQRing         = 0x8000000
	offSQEs           = 0x10000000
	sqeSize           = 64
	cqeSize           = 16
	maxEntries        = 32768
	getEventsArgSize  = 24
)

// Opcodes (io_uring_op).
const (
	OpNop         = 0
	OpReadFixed   = 4
	OpWriteFixed  = 5
	OpFsync       = 3
	OpPollAdd     = 6
	OpAsyncCancel = 14
	OpFallocate   = 17
	OpRead        = 22
	OpWrite       = 23
	OpURingCmd    = 46
)

// FsyncDatasync is IORING_FSYNC_DATASYNC for PrepFsync.
const FsyncDatasync = 1

// SQE flags (io_uring_sqe.flags).
const (
	SQEFixedFile = 1 << 0 // IOSQE_FIXED_FILE: Fd is an index into the registered files
)

// io_uring_register opcodes and flags.
const (
	registerFiles        = 2  // IORING_REGISTER_FILES
	unregisterFiles      = 3  // IORING_UNREGISTER_FILES
	registerBuffers2     = 15 // IORING_REGISTER_BUFFERS2
	rsrcRegisterSparse   = 1  // IORING_RSRC_REGISTER_SPARSE
	rsrcRegisterArgsSize = 32 // sizeof(struct io_uring_rsrc_register)
)

// rsrcRegister is struct io_uring_rsrc_register.
type rsrcRegister struct {
	Nr    uint32
	Flags uint32
	Resv2 uint64
	Data  uint64
	Tags  uint64
}

// ErrRingFull is returned by GetSQE when every SQ slot is taken by SQEs
// that have not been submitted yet.
var ErrRingFull = errors.New("uring: submission queue full")

// ErrTimeout is returned by WaitTimeout when no completion arrived in time.
var ErrTimeout = errors.New("uring: wait timed out")

// sqringOffsets is struct io_sqring_offsets (40 bytes).
type sqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

// cqringOffsets is struct io_cqring_offsets (40 bytes).
type cqringOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

// params is struct io_uring_params (120 bytes).
type params struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  sqringOffsets
	CQOff                                                                  cqringOffsets
}

// getEventsArg is struct io_uring_getevents_arg (24 bytes).
type getEventsArg struct {
	Sigmask   uint64
	SigmaskSz uint32
	MinWait   uint32
	Ts        uint64
}

// Compile-time ABI size checks: a wrong size makes the array length negative.
var (
	_ [unsafe.Sizeof(params{}) - 120]byte
	_ [120 - unsafe.Sizeof(params{})]byte
	_ [unsafe.Sizeof(SQE{}) - 64]byte
	_ [64 - unsafe.Sizeof(SQE{})]byte
	_ [unsafe.Sizeof(CQE{}) - 16]byte
	_ [16 - unsafe.Sizeof(CQE{})]byte
	_ [unsafe.Sizeof(getEventsArg{}) - 24]byte
	_ [24 - unsafe.Sizeof(getEventsArg{})]byte
	_ [unsafe.Sizeof(rsrcRegister{}) - rsrcRegisterArgsSize]byte
	_ [rsrcRegisterArgsSize - unsafe.Sizeof(rsrcRegister{})]byte
)

// SQE is the first 64 bytes of struct io_uring_sqe. For a ring with
// 128-byte SQEs, Cmd80 reaches the 80-byte command area that starts at Cmd.
type SQE struct {
	Opcode      uint8  // @0
	Flags       uint8  // @1 IOSQE_*
	IOPrio      uint16 // @2
	Fd          int32  // @4
	Off         uint64 // @8 file offset, or cmd_op (low 32 bits) for URING_CMD
	Addr        uint64 // @16 buffer address, or length for FALLOCATE
	Len         uint32 // @24 length, or mode for FALLOCATE
	OpFlags     uint32 // @28 rw_flags, fsync_flags, poll32_events, uring_cmd_flags
	UserData    uint64 // @32 returned in the CQE
	BufIndex    uint16 // @40
	Personality uint16 // @42
	FileIndex   int32  // @44
	Cmd         [16]byte
}

// Cmd80 returns the 80-byte URING_CMD payload of a 128-byte SQE. It must only
// be called on SQEs of a ring created with SetupSQE128.
func (s *SQE) Cmd80() *[80]byte {
	return (*[80]byte)(unsafe.Pointer(&s.Cmd))
}

// CQE is struct io_uring_cqe.
type CQE struct {
	UserData uint64 // from the SQE
	Res      int32  // result: >= 0 success, negative errno
	Flags    uint32 // IORING_CQE_F_*
}

// Params configures New.
type Params struct {
	// Entries is the SQ size; the kernel rounds it up to a power of two.
	Entries uint32
	// CQEntries is the CQ size, used when Flags has SetupCQSize.
	CQEntries uint32
	// Flags are IORING_SETUP_* flags (Setup* constants).
	Flags uint32
}

// Ring is one io_uring instance. See the package comment for its
// concurrency rule.
type Ring struct {
	fd      int    // ring file descriptor; -1 once closed
	flags   uint32 // setup flags the ring was created with
	feats   uint32 // IORING_FEAT_* reported by the kernel
	sqeSize int    // 64 or 128

	sqMem  []byte // SQ ring mmap
	cqMem  []byte // CQ ring mmap (nil if shared with sqMem)
	sqeMem []byte // SQE array mmap

	sqHead    *uint32 // kernel-owned SQ head
	sqTail    *uint32 // our SQ tail (published)
	sqFlags   *uint32 // IORING_SQ_* flags
	sqMask    uint32
	sqEntries uint32
	sqLocal   uint32 // tail including SQEs handed out but not yet published

	cqHead    *uint32 // our CQ head
	cqTail    *uint32 // kernel-owned CQ tail
	cqMask    uint32
	cqEntries uint32
	cqes      unsafe.Pointer // first CQE

	arg *getEventsArg // timeout argument for WaitTimeout (heap, pinned by pointer use in syscall)
	ts  *unix.Timespec
}

// New creates a ring. For SetupCQSize, p.CQEntries must be set.
func New(p Params) (*Ring, error) {
	if p.Entries == 0 || p.Entries > maxEntries {
		return nil, fmt.Errorf("uring: %d entries, want 1..%d", p.Entries, maxEntries)
	}
	var kp params
	kp.Flags = p.Flags
	if p.Flags&SetupCQSize != 0 {
		kp.CQEntries = p.CQEntries
	}
	r1, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(p.Entries), uintptr(unsafe.Pointer(&kp)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("uring: io_uring_setup(%d entries, flags %#x): %w", p.Entries, p.Flags, errno)
	}
	r := &Ring{fd: int(r1), flags: p.Flags, feats: kp.Features, sqeSize: sqeSize,
		arg: new(getEventsArg), ts: new(unix.Timespec)}
	if p.Flags&SetupSQE128 != 0 {
		r.sqeSize = 128
	}
	if err := r.mapRings(&kp); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Ring) mapRings(kp *params) error {
	sqLen := int(kp.SQOff.Array) + int(kp.SQEntries)*4
	cqLen := int(kp.CQOff.CQEs) + int(kp.CQEntries)*cqeSize
	if kp.Flags&SetupCQE32 != 0 {
		cqLen = int(kp.CQOff.CQEs) + int(kp.CQEntries)*cqeSize*2
	}
	const singleMmap = 1 // IORING_FEAT_SINGLE_MMAP
	var err error
	if kp.Features&singleMmap != 0 {
		sqLen = max(sqLen, cqLen)
	}
	r.sqMem, err = unix.Mmap(r.fd, offSQRing, sqLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("uring: mmap SQ ring: %w", err)
	}
	cq := r.sqMem
	if kp.Features&singleMmap == 0 {
		r.cqMem, err = unix.Mmap(r.fd, offCQRing, cqLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("uring: mmap CQ ring: %w", err)
		}
		cq = r.cqMem
	}
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(kp.SQEntries)*r.sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("uring: mmap SQEs: %w", err)
	}
	sq := unsafe.Pointer(&r.sqMem[0])
	r.sqHead = (*uint32)(unsafe.Add(sq, kp.SQOff.Head))
	r.sqTail = (*uint32)(unsafe.Add(sq, kp.SQOff.Tail))
	r.sqFlags = (*uint32)(unsafe.Add(sq, kp.SQOff.Flags))
	r.sqMask = *(*uint32)(unsafe.Add(sq, kp.SQOff.RingMask))
	r.sqEntries = *(*uint32)(unsafe.Add(sq, kp.SQOff.RingEntries))
	// Identity map for the SQ index array: slot i always holds SQE i.
	arr := unsafe.Slice((*uint32)(unsafe.Add(sq, kp.SQOff.Array)), r.sqEntries)
	for i := range arr {
		arr[i] = uint32(i)
	}
	r.sqLocal = atomic.LoadUint32(r.sqTail)

	c := unsafe.Pointer(&cq[0])
	r.cqHead = (*uint32)(unsafe.Add(c, kp.CQOff.Head))
	r.cqTail = (*uint32)(unsafe.Add(c, kp.CQOff.Tail))
	r.cqMask = *(*uint32)(unsafe.Add(c, kp.CQOff.RingMask))
	r.cqEntries = *(*uint32)(unsafe.Add(c, kp.CQOff.RingEntries))
	r.cqes = unsafe.Add(c, kp.CQOff.CQEs)
	return nil
}

// Fd returns the ring's file descriptor.
func (r *Ring) Fd() int { return r.fd }

// SQEntries returns the SQ size the kernel chose.
func (r *Ring) SQEntries() uint32 { return r.sqEntries }

// CQEntries returns the CQ size the kernel chose.
func (r *Ring) CQEntries() uint32 { return r.cqEntries }

// SQESize returns 64 or 128.
func (r *Ring) SQESize() int { return r.sqeSize }

// Close unmaps the rings and closes the ring fd. Requests still in flight
// are cancelled by the kernel. Close is idempotent.
func (r *Ring) Close() error {
	var errs []error
	for _, m := range []*[]byte{&r.sqeMem, &r.cqMem, &r.sqMem} {
		if *m != nil {
			if err := unix.Munmap(*m); err != nil {
				errs = append(errs, fmt.Errorf("uring: munmap: %w", err))
			}
			*m = nil
		}
	}
	if r.fd >= 0 {
		if err := unix.Close(r.fd); err != nil {
			errs = append(errs, fmt.Errorf("uring: close: %w", err))
		}
		r.fd = -1
	}
	return errors.Join(errs...)
}

// GetSQE returns the next free SQE, zeroed (all 64 or 128 bytes), or
// ErrRingFull. The SQE is published by the next Submit.
func (r *Ring) GetSQE() (*SQE, error) {
	head := atomic.LoadUint32(r.sqHead)
	if r.sqLocal-head >= r.sqEntries {
		return nil, ErrRingFull
	}
	idx := r.sqLocal & r.sqMask
	r.sqLocal++
	b := r.sqeMem[int(idx)*r.sqeSize : int(idx+1)*r.sqeSize]
	clear(b)
	return (*SQE)(unsafe.Pointer(&b[0])), nil
}

// Pending returns how many SQEs have been handed out by GetSQE and not yet
// consumed by the kernel.
func (r *Ring) Pending() uint32 {
	return r.sqLocal - atomic.LoadUint32(r.sqHead)
}

// Submit publishes prepared SQEs and submits them without waiting.
func (r *Ring) Submit() (int, error) {
	return r.SubmitAndWait(0)
}

// SubmitAndWait publishes prepared SQEs, submits them and waits until at
// least waitNr completions are available. It retries on EINTR.
func (r *Ring) SubmitAndWait(waitNr uint32) (int, error) {
	atomic.StoreUint32(r.sqTail, r.sqLocal)
	var flags uintptr
	if waitNr > 0 || r.needEnter() {
		flags |= enterGetEvents
	}
	for {
		toSubmit := r.sqLocal - atomic.LoadUint32(r.sqHead)
		if toSubmit == 0 && flags == 0 {
			return 0, nil
		}
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(waitNr), flags, 0, 0)
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return 0, fmt.Errorf("uring: io_uring_enter: %w", errno)
		}
		return int(n), nil
	}
}

// needEnter reports whether the kernel asks for an enter with GETEVENTS to
// flush overflowed completions or run deferred task work.
func (r *Ring) needEnter() bool {
	return atomic.LoadUint32(r.sqFlags)&(sqCQOverflow|sqTaskrun) != 0
}

// WaitTimeout submits prepared SQEs and waits up to d for at least one
// completion. It returns ErrTimeout if none arrived; EINTR ends the wait
// early without an error (the caller re-checks its state and waits again).
func (r *Ring) WaitTimeout(d time.Duration) error {
	if r.feats&featExtArg == 0 {
		_, err := r.SubmitAndWait(1)
		return err
	}
	atomic.StoreUint32(r.sqTail, r.sqLocal)
	*r.ts = unix.NsecToTimespec(d.Nanoseconds())
	*r.arg = getEventsArg{Ts: uint64(uintptr(unsafe.Pointer(r.ts)))}
	toSubmit := r.sqLocal - atomic.LoadUint32(r.sqHead)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), 1,
		enterGetEvents|enterExtArg, uintptr(unsafe.Pointer(r.arg)), getEventsArgSize)
	switch errno {
	case 0, syscall.EINTR:
		return nil
	case syscall.ETIME:
		return ErrTimeout
	default:
		return fmt.Errorf("uring: io_uring_enter: %w", errno)
	}
}

// PeekCQE returns the oldest unconsumed completion without consuming it.
func (r *Ring) PeekCQE() (CQE, bool) {
	head := atomic.LoadUint32(r.cqHead)
	if head == atomic.LoadUint32(r.cqTail) {
		return CQE{}, false
	}
	return r.cqeAt(head), true
}

func (r *Ring) cqeAt(i uint32) CQE {
	stride := uintptr(cqeSize)
	if r.flags&SetupCQE32 != 0 {
		stride *= 2
	}
	return *(*CQE)(unsafe.Add(r.cqes, uintptr(i&r.cqMask)*stride))
}

// SeenCQE consumes the completion returned by PeekCQE.
func (r *Ring) SeenCQE() {
	atomic.StoreUint32(r.cqHead, atomic.LoadUint32(r.cqHead)+1)
}

// Reap calls fn for every available completion and consumes them; it
// returns how many there were.
func (r *Ring) Reap(fn func(CQE)) int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	for i := head; i != tail; i++ {
		fn(r.cqeAt(i))
	}
	atomic.StoreUint32(r.cqHead, tail)
	return int(tail - head)
}

// RegisterFiles registers fds as the ring's fixed files: SQEs with
// SQEFixedFile name them by their index in fds. It is called once, on the
// ring's issuer thread.
func (r *Ring) RegisterFiles(fds []int32) error {
	if len(fds) == 0 {
		return nil
	}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerFiles,
		uintptr(unsafe.Pointer(&fds[0])), uintptr(len(fds)), 0, 0)
	if errno != 0 {
		return fmt.Errorf("uring: register %d files: %w", len(fds), errno)
	}
	return nil
}

// UnregisterFiles drops the registered files, and with them the ring's
// references to their open files, at once: closing the ring drops them
// only when its teardown runs, later, in a kernel worker (a lock on such
// a file would outlive the ring's close).
func (r *Ring) UnregisterFiles() error {
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), unregisterFiles, 0, 0, 0, 0)
	if errno != 0 {
		return fmt.Errorf("uring: unregister files: %w", errno)
	}
	return nil
}

// RegisterSparseBuffers creates an empty table of n registered buffers,
// for buffers the kernel itself registers (ublk's AUTO_BUF_REG); SQEs
// READ_FIXED and WRITE_FIXED name them by index.
func (r *Ring) RegisterSparseBuffers(n uint32) error {
	arg := &rsrcRegister{Nr: n, Flags: rsrcRegisterSparse}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerBuffers2,
		uintptr(unsafe.Pointer(arg)), rsrcRegisterArgsSize, 0, 0)
	if errno != 0 {
		return fmt.Errorf("uring: register a sparse table of %d buffers: %w", n, errno)
	}
	return nil
}

// PrepNop fills sqe as a NOP.
func PrepNop(sqe *SQE, userData uint64) {
	sqe.Opcode = OpNop
	sqe.UserData = userData
}

// PrepRead fills sqe as a READ of n bytes at buf from fd at off. buf must be
// memory that does not move (mmap or pinned).
func PrepRead(sqe *SQE, fd int, buf unsafe.Pointer, n uint32, off uint64, userData uint64) {
	sqe.Opcode = OpRead
	sqe.Fd = int32(fd)
	sqe.Addr = uint64(uintptr(buf))
	sqe.Len = n
	sqe.Off = off
	sqe.UserData = userData
}

// PrepWrite fills sqe as a WRITE; rwFlags are RWF_* flags (RWF_DSYNC for FUA).
func PrepWrite(sqe *SQE, fd int, buf unsafe.Pointer, n uint32, off uint64, rwFlags uint32, userData uint64) {
	sqe.Opcode = OpWrite
	sqe.Fd = int32(fd)
	sqe.Addr = uint64(uintptr(buf))
	sqe.Len = n
	sqe.Off = off
	sqe.OpFlags = rwFlags
	sqe.UserData = userData
}

// PrepReadFixed fills sqe as a READ_FIXED of n bytes into registered buffer
// bufIndex at byte offset bufOff of that buffer (for a buffer the kernel
// registered, such as a ublk request's, the address is the offset).
func PrepReadFixed(sqe *SQE, fd int, bufIndex uint16, bufOff uint64, n uint32, off uint64, userData uint64) {
	sqe.Opcode = OpReadFixed
	sqe.Fd = int32(fd)
	sqe.Addr = bufOff
	sqe.Len = n
	sqe.Off = off
	sqe.BufIndex = bufIndex
	sqe.UserData = userData
}

// PrepWriteFixed is PrepReadFixed for a WRITE_FIXED; rwFlags as for PrepWrite.
func PrepWriteFixed(sqe *SQE, fd int, bufIndex uint16, bufOff uint64, n uint32, off uint64, rwFlags uint32, userData uint64) {
	PrepReadFixed(sqe, fd, bufIndex, bufOff, n, off, userData)
	sqe.Opcode = OpWriteFixed
	sqe.OpFlags = rwFlags
}

// PrepFsync fills sqe as an FSYNC; flags may be FsyncDatasync.
func PrepFsync(sqe *SQE, fd int, flags uint32, userData uint64) {
	sqe.Opcode = OpFsync
	sqe.Fd = int32(fd)
	sqe.OpFlags = flags
	sqe.UserData = userData
}

// PrepFallocate fills sqe as a FALLOCATE of length bytes at off with mode
// (FALLOC_FL_* flags). io_uring passes the length in addr and the mode in len.
func PrepFallocate(sqe *SQE, fd int, mode uint32, off, length uint64, userData uint64) {
	sqe.Opcode = OpFallocate
	sqe.Fd = int32(fd)
	sqe.Off = off
	sqe.Addr = length
	sqe.Len = mode
	sqe.UserData = userData
}

// PrepPollAdd fills sqe as a one-shot POLL_ADD for events (POLLIN...).
func PrepPollAdd(sqe *SQE, fd int, events uint32, userData uint64) {
	sqe.Opcode = OpPollAdd
	sqe.Fd = int32(fd)
	sqe.OpFlags = events
	sqe.UserData = userData
}

// PrepCancel fills sqe as an ASYNC_CANCEL of the request with target user data.
func PrepCancel(sqe *SQE, target uint64, userData uint64) {
	sqe.Opcode = OpAsyncCancel
	sqe.Fd = -1
	sqe.Addr = target
	sqe.UserData = userData
}

// PrepURingCmd fills sqe as a URING_CMD with cmdOp on fd. The caller writes
// the command payload into sqe.Cmd (64-byte SQE) or sqe.Cmd80() (128-byte).
func PrepURingCmd(sqe *SQE, fd int, cmdOp uint32, userData uint64) {
	sqe.Opcode = OpURingCmd
	sqe.Fd = int32(fd)
	sqe.Off = uint64(cmdOp) // cmd_op @8, __pad1 @12 stays zero
	sqe.UserData = userData
}
