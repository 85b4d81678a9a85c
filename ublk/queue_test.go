package ublk

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/ublksnap/ublksnap/ublk/internal/uring"
	"golang.org/x/sys/unix"
)

// fakeKernel plays the ublk driver and io_uring for one queue: it accepts
// FETCH and COMMIT_AND_FETCH SQEs, hands out requests the test injects,
// records commits, completes the eventfd READ when the eventfd is written,
// and aborts tags on request. All of its work on the queue's memory runs
// inside SubmitAndWait, on the queue goroutine, as the real kernel's does.
type fakeKernel struct {
	t      *testing.T
	q      *queue
	inject chan fakeReq    // requests to hand out
	abort  chan struct{}   // abort every armed tag
	commit chan fakeCommit // committed results

	// Owned by the queue goroutine (inside SubmitAndWait).
	pending []uring.SQE
	armed   map[uint16]bool
	efdRead bool
	cqes    []uring.CQE
	waiting []fakeReq // injected for tags not armed yet
	aborted bool
	// shortIO caps every backing read and write at this many bytes (0:
	// none), as a file system may; set before requests flow.
	shortIO int
	// targetSQEs counts backing I/O SQEs; read by the test after commits.
	targetSQEs atomic.Int64
}

type fakeReq struct {
	tag  uint16
	desc ioDesc
	data []byte // write payload
}

type fakeCommit struct {
	tag    uint16
	result int32
	data   []byte // read payload (result bytes of the buffer)
}

func newFakeQueue(t *testing.T, depth, maxIO int, h Handler, files ...int32) (*queue, *fakeKernel) {
	t.Helper()
	return newFakeQueueWith(t, depth, maxIO, h, fakeOpts{}, files...)
}

// fakeOpts are the variations of a fake queue.
type fakeOpts struct {
	mode      IOMode // IOModeCopy or IOModeUserCopy
	bufMemory int    // the user-copy pool's limit (0: the default)
	// shortIO caps every backing read and write at this many bytes (0:
	// none), as a file system may.
	shortIO int
}

// newFakeQueueWith is newFakeQueue with options. In user copy the fake
// char device is a sparse temporary file, read and written at the
// positions of the requests' data as the kernel's would be.
func newFakeQueueWith(t *testing.T, depth, maxIO int, h Handler, o fakeOpts, files ...int32) (*queue, *fakeKernel) {
	t.Helper()
	cdevFd := 99
	if o.mode == IOModeUserCopy {
		f, err := os.CreateTemp(t.TempDir(), "cdev")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		cdevFd = int(f.Fd())
	}
	q := newQueue(0, depth, maxIO, cdevFd, true, h, slog.New(slog.NewTextHandler(io.Discard, nil)))
	q.files, q.mode, q.bufMemory = files, o.mode, cmp.Or(o.bufMemory, DefaultBufferMemory)
	q.userCopy = o.mode == IOModeUserCopy
	k := &fakeKernel{t: t, q: q, inject: make(chan fakeReq, 1024), abort: make(chan struct{}, 1),
		commit: make(chan fakeCommit, 4096), armed: map[uint16]bool{}, shortIO: o.shortIO}
	q.ring = k
	q.descs = make([]ioDesc, depth)
	if o.mode == IOModeUserCopy {
		q.pool = newBufPool(maxIO, q.bufMemory)
		q.waiting = make([]uint16, 0, depth)
		t.Cleanup(func() { q.pool.close() })
	} else {
		q.bufs = make([]byte, depth*maxIO)
	}
	q.scratch = make([]byte, pageSize)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	q.efd = efd
	ready := make(chan error, 1)
	go func() {
		q.serve(ready)
		close(q.exited)
	}()
	if err := <-ready; err != nil {
		t.Fatalf("serve: %v", err)
	}
	t.Cleanup(func() {
		q.stop()
		select {
		case <-q.exited:
		case <-time.After(10 * time.Second):
			t.Error("queue did not exit")
		}
		q.closeEventfd()
	})
	return q, k
}

func (k *fakeKernel) GetSQE() (*uring.SQE, error) {
	k.pending = append(k.pending, uring.SQE{})
	return &k.pending[len(k.pending)-1], nil
}

func (k *fakeKernel) Close() error { return nil }

func (k *fakeKernel) Reap(fn func(uring.CQE)) int {
	n := len(k.cqes)
	for _, c := range k.cqes {
		fn(c)
	}
	k.cqes = k.cqes[:0]
	return n
}

func (k *fakeKernel) SubmitAndWait(waitNr uint32) (int, error) {
	n := len(k.pending)
	for i := range k.pending {
		k.submit(&k.pending[i])
	}
	k.pending = k.pending[:0]
	for {
		k.deliver()
		if len(k.cqes) >= int(waitNr) {
			return n, nil
		}
		select {
		case r := <-k.inject:
			k.waiting = append(k.waiting, r)
		case <-k.abort:
			k.aborted = true
		case <-time.After(time.Millisecond):
		}
	}
}

// submit consumes one SQE.
func (k *fakeKernel) submit(s *uring.SQE) {
	if s.UserData&udTarget != 0 {
		k.targetSQEs.Add(1)
		k.cqes = append(k.cqes, uring.CQE{UserData: s.UserData, Res: k.backingIO(s)})
		return
	}
	switch s.Opcode {
	case uring.OpRead:
		if s.Fd != int32(k.q.efd) || s.UserData != udEventfd {
			k.t.Errorf("unexpected READ on fd %d", s.Fd)
		}
		k.efdRead = true
	case uring.OpURingCmd:
		cmd := *(*ioCmd)(unsafe.Pointer(&s.Cmd[0]))
		op := uint32(s.Off)
		if s.Off>>32 != 0 || s.Fd != int32(k.q.cdevFd) || int(cmd.Tag) >= k.q.depth || cmd.QID != 0 || s.UserData != uint64(cmd.Tag) {
			k.t.Errorf("malformed io command %+v %+v", s, cmd)
			return
		}
		if want := k.bufAddr(cmd.Tag); cmd.Addr != want {
			k.t.Errorf("tag %d: buffer %#x, want %#x", cmd.Tag, cmd.Addr, want)
		}
		if k.armed[cmd.Tag] {
			k.t.Errorf("tag %d: command while the kernel holds it", cmd.Tag)
		}
		switch op {
		case ioOpcode(ioFetchReq, true):
		case ioOpcode(ioCommitAndFetch, true):
			c := fakeCommit{tag: cmd.Tag, result: cmd.Result}
			d := k.q.descs[cmd.Tag]
			if d.OpFlags&0xff == descOpRead && cmd.Result > 0 {
				c.data = k.readData(cmd.Tag, int(cmd.Result))
			}
			k.commit <- c
		default:
			k.t.Errorf("unknown io opcode %#x", op)
		}
		if k.aborted {
			k.cqes = append(k.cqes, uring.CQE{UserData: uint64(cmd.Tag), Res: ioResAbort})
			return
		}
		k.armed[cmd.Tag] = true
	default:
		k.t.Errorf("unexpected opcode %d", s.Opcode)
	}
}

// backingIO does a backing I/O SQE with pread, pwrite, fdatasync or
// fallocate, as io-wq would, and returns its CQE result.
func (k *fakeKernel) backingIO(s *uring.SQE) int32 {
	fd := int(s.Fd)
	if s.Flags&uring.SQEFixedFile != 0 {
		if int(s.Fd) >= len(k.q.files) {
			return -int32(unix.EBADF)
		}
		fd = int(k.q.files[s.Fd])
	}
	n := int(s.Len)
	if k.shortIO > 0 && (s.Opcode == uring.OpRead || s.Opcode == uring.OpWrite) {
		n = min(n, k.shortIO)
	}
	var buf []byte
	if s.Opcode == uring.OpRead || s.Opcode == uring.OpWrite {
		// Find the address in the request's buffer.
		b := k.q.reqs[uint16(s.UserData>>16)].Buf
		at := -1
		if len(b) > 0 {
			at = int(s.Addr - uint64(uintptr(unsafe.Pointer(&b[0]))))
		}
		if at < 0 || at+n > len(b) {
			k.t.Errorf("backing I/O outside the request's buffer: %#x+%d", s.Addr, n)
			return -int32(unix.EFAULT)
		}
		buf = b[at : at+n]
	}
	var res int
	var err error
	switch s.Opcode {
	case uring.OpRead:
		res, err = unix.Pread(fd, buf, int64(s.Off))
	case uring.OpWrite:
		res, err = unix.Pwrite(fd, buf, int64(s.Off))
	case uring.OpFsync:
		err = unix.Fdatasync(fd)
	case uring.OpFallocate:
		err = unix.Fallocate(fd, s.Len, int64(s.Off), int64(s.Addr))
	default:
		k.t.Errorf("unexpected backing opcode %d", s.Opcode)
		return -int32(unix.EINVAL)
	}
	if err != nil {
		return -int32(err.(unix.Errno))
	}
	return int32(res)
}

// bufAddr is the buffer address the FETCH or COMMIT of tag must carry.
func (k *fakeKernel) bufAddr(tag uint16) uint64 {
	if k.q.mode == IOModeUserCopy {
		return 0
	}
	return k.q.bufAddr(tag)
}

// writeData puts a WRITE's data where the server finds it.
func (k *fakeKernel) writeData(tag uint16, p []byte) {
	if k.q.mode != IOModeUserCopy {
		copy(k.q.bufs[int(tag)*k.q.maxIO:], p)
		return
	}
	if _, err := unix.Pwrite(k.q.cdevFd, p, userCopyPos(k.q.id, tag)); err != nil {
		k.t.Errorf("fake cdev write: %v", err)
	}
}

// readData returns the n bytes of data a READ of tag committed.
func (k *fakeKernel) readData(tag uint16, n int) []byte {
	if k.q.mode != IOModeUserCopy {
		off := int(tag) * k.q.maxIO
		return bytes.Clone(k.q.bufs[off : off+n])
	}
	p := make([]byte, n)
	if _, err := unix.Pread(k.q.cdevFd, p, userCopyPos(k.q.id, tag)); err != nil {
		k.t.Errorf("fake cdev read: %v", err)
	}
	return p
}

// deliver turns waiting requests, aborts and eventfd writes into CQEs.
func (k *fakeKernel) deliver() {
	rest := k.waiting[:0]
	for _, r := range k.waiting {
		if !k.armed[r.tag] {
			rest = append(rest, r)
			continue
		}
		k.armed[r.tag] = false
		k.q.descs[r.tag] = r.desc
		if r.data != nil {
			k.writeData(r.tag, r.data)
		}
		k.cqes = append(k.cqes, uring.CQE{UserData: uint64(r.tag), Res: ioResOK})
	}
	k.waiting = rest
	if k.aborted {
		for tag, armed := range k.armed {
			if armed {
				k.armed[tag] = false
				k.cqes = append(k.cqes, uring.CQE{UserData: uint64(tag), Res: ioResAbort})
			}
		}
	}
	if k.efdRead {
		var v [8]byte
		if n, _ := unix.Read(k.q.efd, v[:]); n == 8 {
			k.efdRead = false
			k.cqes = append(k.cqes, uring.CQE{UserData: udEventfd, Res: 8})
		}
	}
}

func desc(op uint32, flags uint32, off int64, n int) ioDesc {
	return ioDesc{OpFlags: op | flags, NrSectors: uint32(n >> 9), StartSector: uint64(off >> 9)}
}

func (k *fakeKernel) waitCommit(t *testing.T) fakeCommit {
	t.Helper()
	select {
	case c := <-k.commit:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no commit within 10 s")
		return fakeCommit{}
	}
}

// reqRecord is what a test handler saw of a Request.
type reqRecord struct {
	Op     Op
	Flags  Flags
	Offset int64
	Length int
	Buf    []byte
}

func TestQueueSyncReadWrite(t *testing.T) {
	var seen []reqRecord
	var mu sync.Mutex
	h := HandlerFunc(func(r *Request) error {
		mu.Lock()
		seen = append(seen, reqRecord{Op: r.Op, Flags: r.Flags, Offset: r.Offset, Length: r.Length, Buf: bytes.Clone(r.Buf)})
		mu.Unlock()
		if !r.NoWait() {
			t.Error("first call with NoWait false")
		}
		if r.Op == OpRead {
			for i := range r.Buf {
				r.Buf[i] = byte(r.Offset>>9) + byte(i)
			}
		}
		return nil
	})
	_, k := newFakeQueue(t, 4, 64<<10, h)
	payload := bytes.Repeat([]byte("w"), 8192)
	k.inject <- fakeReq{tag: 1, desc: desc(descOpWrite, descFlagFUA, 4096, 8192), data: payload}
	if c := k.waitCommit(t); c.tag != 1 || c.result != 8192 {
		t.Fatalf("write commit %+v, want tag 1 result 8192", c)
	}
	k.inject <- fakeReq{tag: 2, desc: desc(descOpRead, 0, 1024, 4096)}
	c := k.waitCommit(t)
	if c.tag != 2 || c.result != 4096 || len(c.data) != 4096 || c.data[0] != 2 || c.data[1] != 3 {
		t.Fatalf("read commit tag %d result %d data %v", c.tag, c.result, c.data[:2])
	}
	k.inject <- fakeReq{tag: 1, desc: desc(descOpFlush, 0, 0, 0)}
	if c := k.waitCommit(t); c.result != 0 {
		t.Fatalf("flush result %d", c.result)
	}
	k.inject <- fakeReq{tag: 3, desc: desc(descOpWriteZeroes, descFlagNoUnmap, 1<<20, 1<<20)}
	if c := k.waitCommit(t); c.result != 0 {
		t.Fatalf("write zeroes result %d", c.result)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []reqRecord{
		{Op: OpWrite, Flags: FlagFUA, Offset: 4096, Length: 8192, Buf: payload},
		{Op: OpRead, Offset: 1024, Length: 4096},
		{Op: OpFlush},
		{Op: OpWriteZeroes, Flags: FlagNoUnmap, Offset: 1 << 20, Length: 1 << 20},
	}
	if len(seen) != len(want) {
		t.Fatalf("handler saw %d requests, want %d", len(seen), len(want))
	}
	for i, w := range want {
		g := seen[i]
		if g.Op != w.Op || g.Flags != w.Flags || g.Offset != w.Offset || g.Length != w.Length ||
			(w.Op == OpWrite && !bytes.Equal(g.Buf, w.Buf)) || (w.Op != OpRead && w.Op != OpWrite && g.Buf != nil) {
			t.Errorf("request %d: got %v %#x off %d len %d buf %d bytes, want %v", i, g.Op, g.Flags, g.Offset, g.Length, len(g.Buf), w.Op)
		}
	}
}

func TestQueueErrorMapping(t *testing.T) {
	errs := map[int64]error{
		0:    syscall.ENOSPC,
		512:  fmt.Errorf("wrapped: %w", syscall.EROFS),
		1024: errors.New("opaque"),
	}
	h := HandlerFunc(func(r *Request) error { return errs[r.Offset] })
	_, k := newFakeQueue(t, 2, 4096, h)
	for off, want := range map[int64]int32{0: -int32(syscall.ENOSPC), 512: -int32(syscall.EROFS), 1024: -int32(syscall.EIO)} {
		k.inject <- fakeReq{tag: 0, desc: desc(descOpWrite, 0, off, 512), data: make([]byte, 512)}
		if c := k.waitCommit(t); c.result != want {
			t.Errorf("offset %d: result %d, want %d", off, c.result, want)
		}
	}
	k.inject <- fakeReq{tag: 1, desc: desc(descOpWriteSame, 0, 0, 512)}
	if c := k.waitCommit(t); c.result != -int32(syscall.EOPNOTSUPP) {
		t.Errorf("unknown op: result %d, want -EOPNOTSUPP", c.result)
	}
	k.inject <- fakeReq{tag: 1, desc: desc(descOpRead, 0, 0, 8192)}
	if c := k.waitCommit(t); c.result != -int32(syscall.EIO) {
		t.Errorf("read larger than the buffer: result %d, want -EIO", c.result)
	}
}

// A panicking handler fails its request with EIO, on the queue thread and
// on a worker; the queue keeps serving.
func TestQueueHandlerPanic(t *testing.T) {
	h := HandlerFunc(func(r *Request) error {
		switch {
		case r.Offset == 0:
			panic("handler bug on the queue thread")
		case r.Offset == 512 && r.NoWait():
			return ErrWouldBlock
		case r.Offset == 512:
			panic("handler bug on a worker")
		}
		return nil
	})
	_, k := newFakeQueue(t, 2, 4096, h)
	for _, off := range []int64{0, 512, 1024} {
		k.inject <- fakeReq{tag: 0, desc: desc(descOpWrite, 0, off, 512), data: make([]byte, 512)}
		want := -int32(syscall.EIO)
		if off == 1024 {
			want = 512
		}
		if c := k.waitCommit(t); c.result != want {
			t.Errorf("offset %d: result %d, want %d", off, c.result, want)
		}
	}
}

func TestQueueAsyncAndWouldBlock(t *testing.T) {
	var blocking atomic.Int32
	h := HandlerFunc(func(r *Request) error {
		switch r.Offset {
		case 0: // async
			go func() {
				time.Sleep(time.Millisecond)
				r.Buf[0] = 'a'
				r.Complete(nil)
			}()
			return ErrInProgress
		default: // would block
			if r.NoWait() {
				return fmt.Errorf("busy: %w", syscall.EAGAIN)
			}
			blocking.Add(1)
			r.Buf[0] = 'b'
			return nil
		}
	})
	_, k := newFakeQueue(t, 2, 4096, h)
	k.inject <- fakeReq{tag: 0, desc: desc(descOpRead, 0, 0, 512)}
	k.inject <- fakeReq{tag: 1, desc: desc(descOpRead, 0, 512, 512)}
	got := map[uint16]byte{}
	for i := 0; i < 2; i++ {
		c := k.waitCommit(t)
		if c.result != 512 {
			t.Fatalf("tag %d result %d", c.tag, c.result)
		}
		got[c.tag] = c.data[0]
	}
	if got[0] != 'a' || got[1] != 'b' || blocking.Load() != 1 {
		t.Fatalf("data %v, blocking calls %d", got, blocking.Load())
	}
}

func TestQueueDoubleCompleteIgnored(t *testing.T) {
	h := HandlerFunc(func(r *Request) error {
		r.Complete(nil)
		r.Complete(syscall.EIO) // logged and ignored
		return ErrInProgress
	})
	_, k := newFakeQueue(t, 1, 4096, h)
	k.inject <- fakeReq{tag: 0, desc: desc(descOpWrite, 0, 0, 512), data: make([]byte, 512)}
	if c := k.waitCommit(t); c.result != 512 {
		t.Fatalf("result %d", c.result)
	}
	select {
	case c := <-k.commit:
		t.Fatalf("second commit %+v", c)
	case <-time.After(50 * time.Millisecond):
	}
}

// TestQueueAbortWaitsForHandlers: after the kernel aborts every tag the
// loop still waits for a request a handler holds, commits it, and exits.
func TestQueueAbortWaitsForHandlers(t *testing.T) {
	held := make(chan *Request, 1)
	h := HandlerFunc(func(r *Request) error { held <- r; return ErrInProgress })
	q, k := newFakeQueue(t, 4, 4096, h)
	k.inject <- fakeReq{tag: 2, desc: desc(descOpRead, 0, 0, 512)}
	r := <-held
	k.abort <- struct{}{}
	select {
	case <-q.exited:
		t.Fatal("queue exited while a handler held a request")
	case <-time.After(50 * time.Millisecond):
	}
	r.Complete(nil)
	if c := k.waitCommit(t); c.tag != 2 || c.result != 512 {
		t.Fatalf("commit %+v", c)
	}
	select {
	case <-q.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("queue did not exit after all tags were aborted")
	}
}

// TestQueueStress runs many requests through random paths under -race.
func TestQueueStress(t *testing.T) {
	const depth, n = 32, 5000
	h := HandlerFunc(func(r *Request) error {
		fill := func() {
			if r.Op == OpRead {
				for i := range r.Buf {
					r.Buf[i] = byte(r.Offset>>9) ^ byte(i)
				}
			}
		}
		switch (r.Offset >> 9) % 3 {
		case 0:
			fill()
			return nil
		case 1:
			if r.NoWait() {
				return ErrWouldBlock
			}
			fill()
			return nil
		default:
			go func() { fill(); r.Complete(nil) }()
			return ErrInProgress
		}
	})
	_, k := newFakeQueue(t, depth, 8192, h)
	rng := rand.New(rand.NewSource(1))
	inflight := map[uint16]int64{}
	free := make([]uint16, 0, depth)
	for i := 0; i < depth; i++ {
		free = append(free, uint16(i))
	}
	sent := 0
	for done := 0; done < n; {
		for len(free) > 0 && sent < n {
			tag := free[len(free)-1]
			free = free[:len(free)-1]
			off := int64(rng.Intn(1000)) << 9
			inflight[tag] = off
			k.inject <- fakeReq{tag: tag, desc: desc(descOpRead, 0, off, 4096)}
			sent++
		}
		c := k.waitCommit(t)
		off := inflight[c.tag]
		delete(inflight, c.tag)
		if c.result != 4096 || c.data[7] != byte(off>>9)^7 {
			t.Fatalf("tag %d off %d: result %d data %d", c.tag, off, c.result, c.data[7])
		}
		free = append(free, c.tag)
		done++
	}
}
