package ublk

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// ringFile is a test backing file of n random bytes, registered as file 0.
func ringFile(t *testing.T, n int) (*os.File, []byte) {
	t.Helper()
	data := make([]byte, n)
	rand.New(rand.NewSource(1)).Read(data)
	f, err := os.Create(filepath.Join(t.TempDir(), "backing"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	return f, data
}

// splitHandler serves reads and writes as two backing IOs each (the halves
// of the request, the second half issued from a goroutine for odd
// offsets), flushes as a sync, and counts its Finish calls.
type splitHandler struct {
	finished atomic.Int64
	lastErr  atomic.Value // error of the last Finish with an error
}

func (h *splitHandler) Handle(r *Request) error {
	f := RegisteredFile(0)
	half := r.Length / 2 &^ 511
	switch r.Op {
	case OpRead, OpWrite:
		add := func(off int64, at, n int) {
			if r.Op == OpRead {
				r.Read(f, off, at, n, uint64(at))
			} else {
				r.Write(f, off, at, n, r.Flags&FlagFUA != 0)
			}
		}
		if half > 0 {
			add(r.Offset, 0, half)
		}
		if (r.Offset>>9)%2 == 1 {
			go func() {
				add(r.Offset+int64(half), half, r.Length-half)
				r.Submit()
			}()
			return ErrInProgress
		}
		add(r.Offset+int64(half), half, r.Length-half)
		return nil
	case OpFlush:
		r.Sync(f)
		return nil
	}
	return syscall.EOPNOTSUPP
}

func (h *splitHandler) Finish(r *Request, err error) error {
	h.finished.Add(1)
	if err != nil {
		h.lastErr.Store(err)
	}
	return err
}

// TestQueueRingIO serves reads and writes as backing I/O on the queue's
// ring: split requests, issue from another goroutine, short transfers
// resubmitted for the rest, the full byte count committed, Finish called
// once per request; a read past the end of the file fails with EIO instead
// of looping.
func TestQueueRingIO(t *testing.T) {
	for _, o := range []fakeOpts{{}, {shortIO: 1000}, {mode: IOModeUserCopy}, {mode: IOModeUserCopy, shortIO: 1000}} {
		short := o.shortIO
		f, data := ringFile(t, 1<<20)
		h := &splitHandler{}
		_, k := newFakeQueueWith(t, 4, 128<<10, h, o, int32(f.Fd()))
		reqs := 0
		rnd := rand.New(rand.NewSource(int64(short)))
		for i := 0; i < 40; i++ {
			off := int64(i*7919*512) % (1<<20 - 128<<10)
			n := 512 * (1 + i*13%256)
			if i%2 == 0 {
				k.inject <- fakeReq{tag: uint16(i % 4), desc: desc(descOpRead, 0, off, n)}
				c := k.waitCommit(t)
				if c.result != int32(n) || !bytes.Equal(c.data, data[off:off+int64(n)]) {
					t.Fatalf("short %d: read %d at %d: result %d, data equal %v", short, n, off, c.result, bytes.Equal(c.data, data[off:off+int64(n)]))
				}
			} else {
				p := make([]byte, n)
				rnd.Read(p)
				k.inject <- fakeReq{tag: uint16(i % 4), desc: desc(descOpWrite, descFlagFUA, off, n), data: p}
				if c := k.waitCommit(t); c.result != int32(n) {
					t.Fatalf("short %d: write %d at %d: result %d", short, n, off, c.result)
				}
				copy(data[off:], p)
				got := make([]byte, n)
				if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					t.Fatalf("short %d: write %d at %d did not reach the file (%v)", short, n, off, err)
				}
			}
			reqs++
		}
		k.inject <- fakeReq{tag: 0, desc: desc(descOpFlush, 0, 0, 0)}
		if c := k.waitCommit(t); c.result != 0 {
			t.Fatalf("flush result %d", c.result)
		}
		reqs++
		if got := h.finished.Load(); got != int64(reqs) {
			t.Errorf("short %d: Finish ran %d times for %d requests", short, got, reqs)
		}
		if short > 0 && k.targetSQEs.Load() < int64(reqs*4) {
			t.Errorf("short %d: %d backing SQEs: short transfers were not resubmitted", short, k.targetSQEs.Load())
		}

		// Past the end: the file has 1 MiB, the read wants 4 KiB from 1 MiB - 1 KiB.
		k.inject <- fakeReq{tag: 1, desc: desc(descOpRead, 0, 1<<20-1024, 4096)}
		if c := k.waitCommit(t); c.result != -int32(unix.EIO) {
			t.Errorf("short %d: read past the end committed %d, want -EIO", short, c.result)
		}
		if err, _ := h.lastErr.Load().(error); !errors.Is(err, syscall.EIO) {
			t.Errorf("short %d: Finish saw %v, want EIO", short, err)
		}
	}
}

// TestQueueUserCopyPoolBound: with a pool of one largest buffer, four
// large requests at once take turns (each waits for the buffer of the one
// before) and all complete with the right data; small ones share.
func TestQueueUserCopyPoolBound(t *testing.T) {
	const maxIO = 128 << 10
	f, data := ringFile(t, 1<<20)
	q, k := newFakeQueueWith(t, 4, maxIO, &splitHandler{}, fakeOpts{mode: IOModeUserCopy, bufMemory: maxIO}, int32(f.Fd()))
	for _, n := range []int{maxIO, 4096, maxIO - 512, 96 << 10} {
		for tag := range 4 {
			k.inject <- fakeReq{tag: uint16(tag), desc: desc(descOpRead, 0, int64(tag)*maxIO, n)}
		}
		for range 4 {
			c := k.waitCommit(t)
			off := int64(c.tag) * maxIO
			if c.result != int32(n) || !bytes.Equal(c.data, data[off:off+int64(n)]) {
				t.Fatalf("read %d at %d: result %d, data equal %v", n, off, c.result, bytes.Equal(c.data, data[off:off+int64(n)]))
			}
		}
	}
	// The queue goroutine wrote mapped before it sent the last commit.
	if m := q.pool.mapped; m > maxIO {
		t.Errorf("pool maps %d bytes, limit %d", m, maxIO)
	}
}

// TestBufPool: classes round up to powers of two of pages, buffers are
// reused, the limit holds, and free buffers of other classes make room.
func TestBufPool(t *testing.T) {
	p := newBufPool(1<<20, 1<<20)
	defer p.close()
	for n, c := range map[int]int{1: 0, 4096: 0, 4097: 1, 8192: 1, 12288: 2, 1 << 20: 8} {
		if got := sizeClass(n); got != c {
			t.Errorf("sizeClass(%d) = %d, want %d", n, got, c)
		}
	}
	a, err := p.get(3000)
	if err != nil || len(a) != 4096 {
		t.Fatalf("get(3000): %d bytes, %v", len(a), err)
	}
	p.put(a)
	b, _ := p.get(4096)
	if &a[0] != &b[0] {
		t.Error("a free buffer of the class was not reused")
	}
	if big, err := p.get(1 << 20); big != nil || err != nil {
		t.Errorf("get(1 MiB) with 4 KiB in use of a 1 MiB limit: %d bytes, %v; want nil, nil", len(big), err)
	}
	p.put(b)
	big, err := p.get(1 << 20)
	if err != nil || len(big) != 1<<20 || p.mapped != 1<<20 {
		t.Fatalf("get(1 MiB) with a free 4 KiB buffer: %d bytes, %v, %d mapped", len(big), err, p.mapped)
	}
	if _, err := p.get(2 << 20); err == nil {
		t.Error("get beyond the largest class did not fail")
	}
	p.put(big)
}

// TestQueueFinishRetriesOnWorker: a Finish that answers ErrWouldBlock
// sends the request to a worker, whose Handle (NoWait false) serves it.
func TestQueueFinishRetriesOnWorker(t *testing.T) {
	f, data := ringFile(t, 64<<10)
	var onWorker atomic.Int64
	h := &retryHandler{onWorker: &onWorker}
	_, k := newFakeQueue(t, 2, 64<<10, h, int32(f.Fd()))
	k.inject <- fakeReq{tag: 0, desc: desc(descOpRead, 0, 4096, 8192)}
	c := k.waitCommit(t)
	if c.result != 8192 || !bytes.Equal(c.data, data[4096:4096+8192]) {
		t.Fatalf("result %d, data equal %v", c.result, bytes.Equal(c.data, data[4096:4096+8192]))
	}
	if onWorker.Load() != 1 {
		t.Errorf("worker Handle ran %d times, want 1", onWorker.Load())
	}
}

type retryHandler struct{ onWorker *atomic.Int64 }

func (h *retryHandler) Handle(r *Request) error {
	if !r.NoWait() {
		h.onWorker.Add(1)
		if len(r.IOs()) != 0 {
			return errors.New("the worker got the first attempt's IOs")
		}
	}
	r.Read(RegisteredFile(0), r.Offset, 0, r.Length, 0)
	return nil
}

func (h *retryHandler) Finish(r *Request, err error) error {
	if err == nil && r.NoWait() {
		return ErrWouldBlock // pretend the data read may be stale
	}
	return err
}

// A read that continues the previous one in both the file and the request
// extends it; one with a cookie, of another file, or not contiguous in
// either does not.
func TestRequestReadCoalesces(t *testing.T) {
	a, b := RegisteredFile(0), PlainFile(7)
	r := NewRequest(OpRead, 0, 0, 64<<10, nil, true, func(error) {})
	r.Read(a, 1<<20, 0, 4096, 0)
	r.Read(a, 1<<20+4096, 4096, 4096, 0)   // continues: extends
	r.Read(a, 2<<20, 8192, 4096, 0)        // a gap in the file
	r.Read(a, 2<<20+4096, 16384, 4096, 0)  // a gap in the request
	r.Read(b, 2<<20+8192, 20480, 4096, 0)  // another file
	r.Read(b, 2<<20+12288, 24576, 4096, 9) // a cookie
	r.Read(b, 2<<20+16384, 28672, 4096, 0) // after a cookie's read
	r.Read(b, 2<<20+20480, 32768, 8192, 0) // continues: extends
	type span struct {
		f     File
		off   int64
		at, n int
	}
	want := []span{{a, 1 << 20, 0, 8192}, {a, 2 << 20, 8192, 4096}, {a, 2<<20 + 4096, 16384, 4096},
		{b, 2<<20 + 8192, 20480, 4096}, {b, 2<<20 + 12288, 24576, 4096}, {b, 2<<20 + 16384, 28672, 12288}}
	var got []span
	for _, io := range r.IOs() {
		f, off, at, n := io.Data()
		got = append(got, span{f, off, at, n})
	}
	if !slices.Equal(got, want) {
		t.Errorf("IOs %+v, want %+v", got, want)
	}
}
