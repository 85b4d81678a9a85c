package ublk

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/ublksnap/ublksnap/ublk/internal/uring"
	"golang.org/x/sys/unix"
)

// queueRing is the part of *uring.Ring a queue uses; tests substitute a
// fake that plays the kernel.
type queueRing interface {
	GetSQE() (*uring.SQE, error)
	SubmitAndWait(waitNr uint32) (int, error)
	Reap(fn func(uring.CQE)) int
	Close() error
}

// User data of the queue ring's SQEs: the tag for ublk commands, a marker
// bit for the eventfd read, another for backing I/O, which carries the tag
// in bits 16-31 and the index of the request's IO in bits 0-15.
const (
	udEventfd = 1 << 63
	udTarget  = 1 << 62
)

// maxIOsPerRequest bounds the IOs of one request (their index must fit
// the user data).
const maxIOsPerRequest = 1 << 16

// completion is a Request.Complete result waiting to be committed, or a
// Request.Submit waiting for its I/O to be issued.
type completion struct {
	tag    uint16
	result int32
	submit bool
}

// autoBufReg is struct ublk_auto_buf_reg as it travels in the SQE's addr:
// the index of the registered-buffer slot the kernel fills with the
// request's pages (the tag's own slot here).
func autoBufReg(index uint16) uint64 { return uint64(index) }

// queue serves one ublk hardware queue. Its goroutine locks itself to an OS
// thread for its whole life, because the kernel accepts FETCH and
// COMMIT_AND_FETCH for a queue only from the thread that fetched it; that
// goroutine owns the ring, the descriptor mmap and the buffers. Handlers
// complete asynchronous requests from any goroutine through complete, which
// queues the result and wakes the loop with an eventfd whose READ is always
// pending on the ring.
type queue struct {
	id      uint16       // queue id; immutable
	depth   int          // number of tags; immutable
	maxIO   int          // bytes per tag buffer; immutable
	cdevFd  int          // /dev/ublkcN; owned by the Device, immutable here
	encoded bool         // ioctl-encoded IO opcodes; immutable
	h       Handler      // immutable
	log     *slog.Logger // immutable
	nworker int          // blocking workers for ErrWouldBlock requests; immutable
	cpus    *unix.CPUSet // CPUs to pin the queue thread to, nil: no pinning; immutable
	// untrusted sends the first FETCHes without CAP_SYS_ADMIN in the
	// thread's effective set (Config.NoPartitionScan); immutable.
	untrusted bool
	// mode is the device's data mode: in zero copy the kernel registers
	// each request's pages at the tag's slot of the ring's buffer table; in
	// copy mode each tag has its buffer in bufs; in user copy requests take
	// buffers from pool while they are in flight; immutable.
	mode      IOMode
	bufMemory int // the pool's limit in user copy (Config.BufferMemory); immutable
	// userCopy: the device has UBLK_F_USER_COPY: in user-copy mode every
	// READ and WRITE takes a pool buffer (in zero copy, see writeData), and
	// Request.CopyIn writes through the char device; immutable.
	userCopy bool
	// writeData (Config.WriteData) and inlineMax (Config.InlineMax): in
	// zero copy with userCopy, WRITEs and requests of up to inlineMax
	// bytes take pool buffers; immutable.
	writeData bool
	inlineMax int
	files     []int32  // Config.Files, registered on the ring; immutable
	finisher  Finisher // h as a Finisher, or nil; immutable

	// Owned by the queue goroutine.
	ring     queueRing
	descs    []ioDesc        // kernel-written request descriptors, by tag (read-only mmap)
	bufs     []byte          // copy mode: depth × maxIO bytes of anonymous mmap
	pool     *bufPool        // user copy: the request buffers
	waiting  []uint16        // user copy: tags waiting for a buffer, oldest first (capacity depth)
	scratch  []byte          // one page: the eventfd read target
	reqs     []Request       // one per tag
	mmaps    [][]byte        // everything to munmap at exit
	efdArm   bool            // an eventfd READ is pending on the ring
	live     int             // tags whose command the kernel holds or we are serving
	busy     int             // requests handed to a handler or worker, not yet completed
	errOnce  bool            // an unexpected CQE result was logged
	handleFn func(uring.CQE) // q.handleCQE, bound once to avoid an allocation per loop

	efd  int           // eventfd that wakes the loop; closed after the goroutine exits
	work chan *Request // requests for the blocking workers; closed at exit
	wg   sync.WaitGroup

	// mu guards done.
	mu    sync.Mutex
	done  []completion
	spare []completion // recycled done slice; owned by the queue goroutine

	wakePending atomic.Bool // an eventfd write is outstanding
	quit        atomic.Bool // leave the loop even if the kernel still holds tags
	exited      chan struct{}
	exitErr     error // why the loop ended abnormally; read after exited is closed
}

func newQueue(id int, depth, maxIO, cdevFd int, encoded bool, h Handler, log *slog.Logger) *queue {
	q := &queue{
		id: uint16(id), depth: depth, maxIO: maxIO, cdevFd: cdevFd, encoded: encoded, h: h,
		log: log.With("queue", id), nworker: min(depth, 16), efd: -1,
		exited: make(chan struct{}),
	}
	q.handleFn = q.handleCQE
	q.finisher, _ = h.(Finisher)
	q.reqs = make([]Request, depth)
	for i := range q.reqs {
		q.reqs[i].q = q
		q.reqs[i].tag = uint16(i)
	}
	return q
}

// descAreaOffset is the mmap offset of queue qid's descriptors on
// /dev/ublkcN: the kernel spaces them by the maximum depth, not the real one.
func descAreaOffset(qid int) int64 {
	stride := (maxQueueDepth*int(unsafe.Sizeof(ioDesc{})) + pageSize - 1) / pageSize * pageSize
	return int64(qid * stride)
}

// run is the queue goroutine. It reports setup success or failure on ready
// exactly once, then serves until all tags are aborted or quit is set.
func (q *queue) run(ready chan<- error) {
	runtime.LockOSThread() // never unlocked: the kernel binds the queue to this thread
	defer close(q.exited)
	// Best effort: allocations on this thread must not recurse into our own
	// device through reclaim (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE).
	_ = unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0)
	if q.cpus != nil {
		// Only this locked thread is affected, and it never runs another goroutine.
		if err := unix.SchedSetaffinity(0, q.cpus); err != nil {
			q.log.Warn("ublk: cannot pin the queue thread", "cpus", q.cpus.Count(), "err", err)
		}
	}
	if err := q.openKernel(); err != nil {
		q.release()
		ready <- err
		return
	}
	q.serve(ready)
	q.release()
}

// openKernel creates the ring, maps the descriptors and allocates buffers.
func (q *queue) openKernel() error {
	// Room for each tag's command and a few backing SQEs at once; more
	// wait in sqe() for a submit.
	entries := uint32(2*q.depth + 16)
	p := uring.Params{Entries: entries, CQEntries: 2 * entries,
		Flags: uring.SetupCQSize | uring.SetupSingleIssuer | uring.SetupDeferTaskrun | uring.SetupCoopTaskrun}
	r, err := uring.New(p)
	if errors.Is(err, unix.EINVAL) {
		p.Flags = uring.SetupCQSize
		r, err = uring.New(p)
	}
	if err != nil {
		return fmt.Errorf("ublk: queue %d ring: %w", q.id, err)
	}
	q.ring = r
	descLen := (q.depth*int(unsafe.Sizeof(ioDesc{})) + pageSize - 1) / pageSize * pageSize
	dm, err := unix.Mmap(q.cdevFd, descAreaOffset(int(q.id)), descLen, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: mmap descriptors: %w", q.id, err)
	}
	q.mmaps = append(q.mmaps, dm)
	q.descs = unsafe.Slice((*ioDesc)(unsafe.Pointer(&dm[0])), q.depth)
	if err := r.RegisterFiles(q.files); err != nil {
		return fmt.Errorf("ublk: queue %d: %w", q.id, err)
	}
	switch q.mode {
	case IOModeZeroCopy:
		if err := r.RegisterSparseBuffers(uint32(q.depth)); err != nil {
			return fmt.Errorf("ublk: queue %d: %w", q.id, err)
		}
	case IOModeCopy:
		q.bufs, err = unix.Mmap(-1, 0, q.depth*q.maxIO, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			return fmt.Errorf("ublk: queue %d: mmap %d buffers of %d bytes: %w", q.id, q.depth, q.maxIO, err)
		}
		q.mmaps = append(q.mmaps, q.bufs)
	}
	if q.userCopy {
		q.pool = newBufPool(q.maxIO, q.bufMemory)
		q.waiting = make([]uint16, 0, q.depth)
	}
	q.scratch, err = unix.Mmap(-1, 0, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: mmap scratch page: %w", q.id, err)
	}
	q.mmaps = append(q.mmaps, q.scratch)
	q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: eventfd: %w", q.id, err)
	}
	return nil
}

// release frees what openKernel created, on the queue's thread: descriptor
// mmap first (DEL_DEV waits for it), then the ring, then the buffers.
func (q *queue) release() {
	for _, m := range q.mmaps {
		if err := unix.Munmap(m); err != nil {
			q.log.Error("ublk: munmap", "err", err)
		}
	}
	q.mmaps, q.descs, q.bufs, q.scratch = nil, nil, nil, nil
	if q.pool != nil {
		q.pool.close()
	}
	if r, ok := q.ring.(interface{ UnregisterFiles() error }); ok && len(q.files) > 0 {
		// Now, not when the ring's teardown runs: a new server of the same
		// backing must find its lock free once the device is closed.
		if err := r.UnregisterFiles(); err != nil {
			q.log.Error("ublk: unregister the backing files", "err", err)
		}
	}
	if q.ring != nil {
		if err := q.ring.Close(); err != nil {
			q.log.Error("ublk: close queue ring", "err", err)
		}
		q.ring = nil
	}
}

// closeEventfd is called by the Device after the goroutine has exited and no
// Complete can run any more.
func (q *queue) closeEventfd() {
	if q.efd >= 0 {
		unix.Close(q.efd)
		q.efd = -1
	}
}

// bufAddr returns the address of tag's buffer.
func (q *queue) bufAddr(tag uint16) uint64 {
	return uint64(uintptr(unsafe.Pointer(&q.bufs[int(tag)*q.maxIO])))
}

// sqe returns a free SQE, submitting queued ones first if the SQ is full.
func (q *queue) sqe() (*uring.SQE, error) {
	s, err := q.ring.GetSQE()
	if errors.Is(err, uring.ErrRingFull) {
		if _, err = q.ring.SubmitAndWait(0); err != nil {
			return nil, err
		}
		s, err = q.ring.GetSQE()
	}
	return s, err
}

// prepIO queues a FETCH (result ignored) or COMMIT_AND_FETCH for tag.
func (q *queue) prepIO(nr uint32, tag uint16, result int32) error {
	s, err := q.sqe()
	if err != nil {
		return err
	}
	uring.PrepURingCmd(s, q.cdevFd, ioOpcode(nr, q.encoded), uint64(tag))
	cmd := ioCmd{QID: q.id, Tag: tag, Result: result}
	switch q.mode {
	case IOModeZeroCopy:
		s.Addr = autoBufReg(tag)
	case IOModeCopy:
		cmd.Addr = q.bufAddr(tag)
	}
	*(*ioCmd)(unsafe.Pointer(&s.Cmd[0])) = cmd
	return nil
}

// armEventfd queues the READ that completes when complete writes the eventfd.
func (q *queue) armEventfd() error {
	s, err := q.sqe()
	if err != nil {
		return err
	}
	uring.PrepRead(s, q.efd, unsafe.Pointer(&q.scratch[0]), 8, 0, udEventfd)
	q.efdArm = true
	return nil
}

// serve fetches every tag, reports readiness and runs the loop: submit and
// wait, handle completions, queue commits, until every tag has been
// aborted by the kernel and no handler holds a request, or quit is set.
func (q *queue) serve(ready chan<- error) {
	q.work = make(chan *Request, q.depth)
	for i := 0; i < q.nworker; i++ {
		q.wg.Add(1)
		go q.worker()
	}
	defer func() {
		close(q.work)
		q.wg.Wait()
	}()
	err := q.armEventfd()
	for tag := 0; tag < q.depth && err == nil; tag++ {
		err = q.prepIO(ioFetchReq, uint16(tag), 0)
	}
	if err == nil {
		submit := func() error { _, err := q.ring.SubmitAndWait(0); return err }
		if q.untrusted {
			err = withoutSysAdmin(submit)
		} else {
			err = submit()
		}
	}
	if err != nil {
		ready <- fmt.Errorf("ublk: queue %d: fetch: %w", q.id, err)
		return
	}
	q.live = q.depth
	ready <- nil

	for q.live > 0 || q.busy > 0 {
		if q.quit.Load() && q.busy == 0 {
			break
		}
		if _, err := q.ring.SubmitAndWait(1); err != nil {
			q.exitErr = fmt.Errorf("ublk: queue %d: %w", q.id, err)
			q.log.Error("ublk: queue loop failed", "err", err)
			// Without a working ring nothing can be committed; wait for
			// handlers to let go of their buffers, then leave.
			q.waitHandlers()
			return
		}
		q.ring.Reap(q.handleFn)
		if q.wakePending.Load() {
			q.drainCompletions()
		}
		if len(q.waiting) > 0 {
			q.serveWaiting()
		}
		if !q.efdArm {
			if err := q.armEventfd(); err != nil {
				q.log.Error("ublk: arm eventfd", "err", err)
			}
		}
	}
}

// waitHandlers blocks until every request handed to a handler has been
// completed, without committing anything.
func (q *queue) waitHandlers() {
	for q.busy > 0 {
		var v [8]byte
		unix.Read(q.efd, v[:])
		q.wakePending.Store(false)
		q.mu.Lock()
		n := len(q.done)
		q.done = q.done[:0]
		q.mu.Unlock()
		q.busy -= n
		if q.busy > 0 && n == 0 {
			var fds = []unix.PollFd{{Fd: int32(q.efd), Events: unix.POLLIN}}
			unix.Poll(fds, 1000)
		}
	}
}

func (q *queue) handleCQE(c uring.CQE) {
	if c.UserData == udEventfd {
		q.efdArm = false
		if c.Res < 0 && c.Res != -int32(unix.EAGAIN) && c.Res != -int32(unix.ECANCELED) {
			q.log.Error("ublk: eventfd read failed", "err", syscall.Errno(-c.Res))
		}
		return
	}
	if c.UserData&udTarget != 0 {
		q.targetDone(uint16(c.UserData>>16), int(c.UserData&0xffff), c.Res)
		return
	}
	tag := uint16(c.UserData)
	if int(tag) >= q.depth {
		q.log.Error("ublk: completion for an unknown tag", "user_data", c.UserData, "res", c.Res)
		return
	}
	switch {
	case c.Res == ioResOK:
		q.dispatch(tag)
	case c.Res == ioResAbort:
		q.live--
	default:
		// The command itself was refused; the kernel does not hold the
		// tag any more.
		q.live--
		if !q.errOnce {
			q.errOnce = true
			q.log.Error("ublk: io command failed", "tag", tag, "res", c.Res, "err", syscall.Errno(-c.Res))
		}
	}
}

// dispatch builds the Request for tag from its descriptor and runs the
// handler in non-blocking mode.
func (q *queue) dispatch(tag uint16) {
	d := q.descs[tag]
	r := &q.reqs[tag]
	q.busy++ // until its commit
	r.Flags = 0
	if d.OpFlags&descFlagFUA != 0 {
		r.Flags |= FlagFUA
	}
	if d.OpFlags&descFlagNoUnmap != 0 {
		r.Flags |= FlagNoUnmap
	}
	r.Offset = int64(d.StartSector) << sectorShift
	r.Length = int(d.NrSectors) << sectorShift
	r.Buf = nil
	r.Private = 0
	r.ClearIO()
	switch d.OpFlags & 0xff {
	case descOpRead:
		r.Op = OpRead
	case descOpWrite:
		r.Op = OpWrite
	case descOpFlush:
		r.Op = OpFlush
	case descOpDiscard:
		r.Op = OpDiscard
	case descOpWriteZeroes:
		r.Op = OpWriteZeroes
	default:
		q.commit(tag, -int32(unix.EOPNOTSUPP))
		return
	}
	if r.Op == OpRead || r.Op == OpWrite {
		if r.Length > q.maxIO || r.Length <= 0 {
			q.log.Error("ublk: request larger than its buffer", "op", r.Op, "len", r.Length, "max", q.maxIO)
			q.commit(tag, -int32(unix.EIO))
			return
		}
		switch {
		case q.mode == IOModeCopy:
			off := int(tag) * q.maxIO
			r.Buf = q.bufs[off : off+r.Length : off+r.Length]
		case q.userCopy && (q.mode == IOModeUserCopy || r.Op == OpWrite && q.writeData || r.Length <= q.inlineMax):
			if len(q.waiting) > 0 {
				q.waiting = append(q.waiting, tag) // after those before it
				return
			}
			switch q.copyIn(r) {
			case copyWait:
				q.waiting = append(q.waiting, tag)
				return
			case copyFailed:
				return
			}
		}
	}
	q.start(r)
}

// start runs the handler on r in non-blocking mode.
func (q *queue) start(r *Request) {
	r.noWait = true
	r.state.Store(reqBusy)
	q.outcome(r, q.handle(r))
}

// What copyIn did.
const (
	copyDone   = iota // r has its buffer (holding a WRITE's data)
	copyWait          // the pool is spent: r waits for a buffer
	copyFailed        // r was failed
)

// userCopyPos is the position in /dev/ublkcN of byte 0 of the data of
// queue qid's request tag (UBLKSRV_IO_BUF_OFFSET + qid << 41 + tag << 25).
func userCopyPos(qid, tag uint16) int64 {
	return 0x80000000 + int64(qid)<<41 + int64(tag)<<25
}

// copyIn gives r a buffer from the pool and, for a WRITE, copies the
// request's data into it from the kernel.
func (q *queue) copyIn(r *Request) int {
	b, err := q.pool.get(r.Length)
	switch {
	case err != nil:
		q.log.Error("ublk: no request buffer", "req", r.String(), "err", err)
		q.commit(r.tag, -int32(unix.EIO))
		return copyFailed
	case b == nil:
		return copyWait
	}
	r.poolBuf, r.Buf = b, b[:r.Length:r.Length]
	if r.Op == OpWrite {
		if n, err := unix.Pread(q.cdevFd, r.Buf, userCopyPos(q.id, r.tag)); err != nil || n != r.Length {
			q.log.Error("ublk: copy a write's data from the kernel", "req", r.String(), "copied", n, "err", err)
			q.commit(r.tag, -int32(unix.EIO))
			return copyFailed
		}
	}
	return copyDone
}

// serveWaiting starts the requests waiting for a buffer, oldest first,
// as long as the pool has room.
func (q *queue) serveWaiting() {
	for len(q.waiting) > 0 {
		r := &q.reqs[q.waiting[0]]
		res := q.copyIn(r)
		if res == copyWait {
			return
		}
		n := copy(q.waiting, q.waiting[1:])
		q.waiting = q.waiting[:n]
		if res == copyDone {
			q.start(r)
		}
	}
}

// outcome acts on what Handle or Finish answered for r, which the handler
// held (state reqBusy) until it answered.
func (q *queue) outcome(r *Request, err error) {
	switch {
	case errors.Is(err, ErrInProgress):
		// The handler calls Complete or Submit later (maybe already did).
	case isWouldBlock(err):
		r.ClearIO()
		q.work <- r // never blocks: capacity is depth
	case !r.state.CompareAndSwap(reqBusy, reqIdle):
		// The handler called Complete and then returned a result: the
		// queued completion is the one that counts.
		q.log.Warn("ublk: handler completed a request and also returned", "req", r.String(), "ret", err)
	case err == nil && r.next < len(r.ios):
		q.issue(r)
	default:
		q.commit(r.tag, r.result(err))
	}
}

// issue starts the I/O the handler described from r.ios[r.next]: every IO
// up to the next one that must wait for those before it.
func (q *queue) issue(r *Request) {
	r.state.Store(reqIO)
	if len(r.ios) > maxIOsPerRequest {
		q.log.Error("ublk: request described too many IOs", "req", r.String(), "ios", len(r.ios))
		r.ioErr = -int32(unix.EIO)
		r.next = len(r.ios)
	}
	for r.next < len(r.ios) && r.ioErr == 0 {
		io := &r.ios[r.next]
		if io.after && r.inflight > 0 {
			break
		}
		if err := q.prepTarget(r, r.next); err != nil {
			q.log.Error("ublk: backing I/O not issued", "req", r.String(), "err", err)
			r.ioErr = -int32(unix.EIO)
			break
		}
		r.next++
		if io.after {
			break // what follows waits for it
		}
	}
	if r.inflight == 0 {
		q.ioFinished(r)
	}
}

// prepTarget queues the SQE of r.ios[i], for what it has not transferred
// yet.
func (q *queue) prepTarget(r *Request, i int) error {
	io := &r.ios[i]
	s, err := q.sqe()
	if err != nil {
		return err
	}
	ud := udTarget | uint64(r.tag)<<16 | uint64(i)
	fd := int(io.file.fd)
	rest, at, off := io.n-io.done, io.at+int(io.done), uint64(io.off+io.done)
	if (io.kind == ioRead || io.kind == ioWrite) && (io.at < 0 || io.n <= 0 || int64(io.at)+io.n > int64(r.Length)) {
		uring.PrepNop(s, ud)
		return fmt.Errorf("IO %d: %d bytes at %d of a %d-byte request", i, io.n, io.at, r.Length)
	}
	switch io.kind {
	case ioRead:
		if q.mode == IOModeZeroCopy {
			uring.PrepReadFixed(s, fd, r.tag, uint64(at), uint32(rest), off, ud)
		} else {
			uring.PrepRead(s, fd, unsafe.Pointer(&r.Buf[at]), uint32(rest), off, ud)
		}
	case ioWrite:
		var fl uint32
		if io.dsync {
			fl = unix.RWF_DSYNC
		}
		if q.mode == IOModeZeroCopy {
			uring.PrepWriteFixed(s, fd, r.tag, uint64(at), uint32(rest), off, fl, ud)
		} else {
			uring.PrepWrite(s, fd, unsafe.Pointer(&r.Buf[at]), uint32(rest), off, fl, ud)
		}
	case ioSync:
		uring.PrepFsync(s, fd, uring.FsyncDatasync, ud)
	case ioFallocate:
		uring.PrepFallocate(s, fd, io.mode, uint64(io.off), uint64(io.n), ud)
	}
	if io.file.fixed {
		s.Flags |= uring.SQEFixedFile
	}
	r.inflight++
	return nil
}

// targetDone takes the completion of backing IO i of tag's request.
func (q *queue) targetDone(tag uint16, i int, res int32) {
	if int(tag) >= q.depth || i >= len(q.reqs[tag].ios) || q.reqs[tag].state.Load() != reqIO {
		q.log.Error("ublk: completion of unknown backing I/O", "tag", tag, "io", i, "res", res)
		return
	}
	r := &q.reqs[tag]
	io := &r.ios[i]
	r.inflight--
	switch {
	case res < 0:
		if r.ioErr == 0 {
			r.ioErr = res
		}
	case io.kind == ioRead || io.kind == ioWrite:
		io.done += int64(res)
		if io.done < io.n && r.ioErr == 0 {
			if res == 0 {
				// End of file (the file shrank under us) or a device that
				// takes nothing: never loop on it.
				r.ioErr = -int32(unix.EIO)
			} else if err := q.prepTarget(r, i); err != nil {
				r.ioErr = -int32(unix.EIO)
			}
		}
	}
	if r.inflight == 0 {
		q.issue(r) // the next group, or the end
	}
}

// ioFinished ends r's backing I/O: the handler's Finish sees the outcome,
// then the request commits (or goes on, as Finish says).
func (q *queue) ioFinished(r *Request) {
	var err error
	if r.ioErr != 0 {
		err = syscall.Errno(-r.ioErr)
		r.next = len(r.ios)
	}
	r.ioErr = 0
	r.state.Store(reqBusy)
	if q.finisher != nil {
		err = q.finish(r, err)
	}
	q.outcome(r, err)
}

// finish runs Finisher.Finish on r; a panic fails the request with EIO.
func (q *queue) finish(r *Request, ioErr error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			q.log.Error("ublk: handler's Finish panicked; failing the request with EIO", "req", r.String(), "panic", p, "stack", string(debug.Stack()))
			err = syscall.EIO
		}
	}()
	return q.finisher.Finish(r, ioErr)
}

// handle runs the Handler on r. A panic fails only that request, with
// EIO, and is logged: the queue and every other request go on.
func (q *queue) handle(r *Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			q.log.Error("ublk: handler panicked; failing the request with EIO", "req", r.String(), "panic", p, "stack", string(debug.Stack()))
			err = syscall.EIO
		}
	}()
	return q.h.Handle(r)
}

// commit queues COMMIT_AND_FETCH for tag with result: the request ends.
// In user copy a READ's data goes to the kernel first and the buffer back
// to the pool.
func (q *queue) commit(tag uint16, result int32) {
	q.busy--
	r := &q.reqs[tag]
	if r.poolBuf != nil {
		if r.Op == OpRead && result > 0 {
			if n, err := unix.Pwrite(q.cdevFd, r.Buf[:result], userCopyPos(q.id, tag)); err != nil || n != int(result) {
				q.log.Error("ublk: copy a read's data to the kernel", "req", r.String(), "copied", n, "err", err)
				result = -int32(unix.EIO)
			}
		}
		q.pool.put(r.poolBuf)
		r.poolBuf = nil
	}
	r.Buf = nil
	if err := q.prepIO(ioCommitAndFetch, tag, result); err != nil {
		// Only a broken ring gets here; the loop fails on its next enter.
		q.log.Error("ublk: queue commit", "tag", tag, "err", err)
	}
}

// worker runs requests that answered ErrWouldBlock, allowed to block.
func (q *queue) worker() {
	defer q.wg.Done()
	for r := range q.work {
		r.noWait = false
		err := q.handle(r)
		switch {
		case errors.Is(err, ErrInProgress):
		case isWouldBlock(err):
			q.log.Error("ublk: handler would block in blocking mode", "req", r.String())
			r.Complete(syscall.EIO)
		case err == nil && r.next < len(r.ios):
			r.Submit()
		default:
			r.Complete(err)
		}
	}
}

// enqueue records an asynchronous result (or a Submit) and wakes the
// queue loop. Any goroutine may call it.
func (q *queue) enqueue(c completion) {
	q.mu.Lock()
	q.done = append(q.done, c)
	q.mu.Unlock()
	if q.wakePending.CompareAndSwap(false, true) {
		q.wake()
	}
}

// wake writes the eventfd.
func (q *queue) wake() {
	var v [8]byte
	*(*uint64)(unsafe.Pointer(&v[0])) = 1
	if _, err := unix.Write(q.efd, v[:]); err != nil && err != unix.EAGAIN {
		q.log.Error("ublk: eventfd write", "err", err)
	}
}

// stop asks the loop to exit without waiting for the kernel's aborts.
func (q *queue) stop() {
	q.quit.Store(true)
	q.wake()
}

// drainCompletions commits everything Complete has queued.
func (q *queue) drainCompletions() {
	q.wakePending.Store(false)
	q.mu.Lock()
	done := q.done
	q.done = q.spare[:0]
	q.mu.Unlock()
	for _, c := range done {
		r := &q.reqs[c.tag]
		if c.submit {
			if r.next < len(r.ios) {
				q.issue(r)
				continue
			}
			c.result = r.result(nil)
		}
		r.state.Store(reqIdle)
		q.commit(c.tag, c.result)
	}
	q.spare = done
}

// withoutSysAdmin runs f with CAP_SYS_ADMIN removed from the effective
// capabilities of the calling thread (only: capset(2) with pid 0 changes
// the caller's thread), and restores them after. The kernel records a
// queue's server as trusted only if the thread completing its FETCHes has
// CAP_SYS_ADMIN (ublk_mark_io_ready) and suppresses the partition scan of
// a device with an untrusted server. The caller must be locked to its
// thread.
func withoutSysAdmin(f func() error) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData // 64 capability bits in two words
	if err := unix.Capget(&hdr, &caps[0]); err != nil {
		return fmt.Errorf("capget: %w", err)
	}
	saved := caps
	caps[unix.CAP_SYS_ADMIN/32].Effective &^= 1 << (unix.CAP_SYS_ADMIN % 32)
	if err := unix.Capset(&hdr, &caps[0]); err != nil {
		return fmt.Errorf("drop CAP_SYS_ADMIN: %w", err)
	}
	err := f()
	if rerr := unix.Capset(&hdr, &saved[0]); rerr != nil && err == nil {
		err = fmt.Errorf("restore CAP_SYS_ADMIN: %w", rerr)
	}
	return err
}
