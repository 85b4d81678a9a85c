//go:build vmtest

package integration

import (
	"math/rand"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// asyncHandler takes every request and completes it from another goroutine
// after a short random delay.
type asyncHandler struct {
	inner ublk.Handler
	taken atomic.Int64
}

func (a *asyncHandler) Handle(r *ublk.Request) error {
	a.taken.Add(1)
	delay := time.Duration(rand.Intn(500)) * time.Microsecond
	go func() {
		time.Sleep(delay)
		r.Complete(a.inner.Handle(r))
	}()
	return ublk.ErrInProgress
}

// wouldBlockHandler refuses every request on the queue thread, so all of
// them run on the blocking workers.
type wouldBlockHandler struct {
	inner   ublk.Handler
	refused atomic.Int64
	served  atomic.Int64
}

func (w *wouldBlockHandler) Handle(r *ublk.Request) error {
	if r.NoWait() {
		w.refused.Add(1)
		return ublk.ErrWouldBlock
	}
	w.served.Add(1)
	return w.inner.Handle(r)
}

// mixedHandler picks one of the three paths at random per request.
type mixedHandler struct{ inner ublk.Handler }

func (m mixedHandler) Handle(r *ublk.Request) error {
	switch rand.Intn(3) {
	case 0:
		return m.inner.Handle(r)
	case 1:
		if r.NoWait() {
			return ublk.ErrWouldBlock
		}
		return m.inner.Handle(r)
	default:
		go func() { r.Complete(m.inner.Handle(r)) }()
		return ublk.ErrInProgress
	}
}

func TestUblkAsyncHandler(t *testing.T) {
	var h *asyncHandler
	fioVerifyWith(t, storage.OpenOptions{}, func(_ ublk.Handler, f *storage.File) ublk.Handler { h = &asyncHandler{inner: syncFile{f}}; return h })
	if h.taken.Load() == 0 {
		t.Fatal("the async handler saw no request")
	}
}

func TestUblkWouldBlockHandler(t *testing.T) {
	var h *wouldBlockHandler
	fioVerifyWith(t, storage.OpenOptions{}, func(_ ublk.Handler, f *storage.File) ublk.Handler {
		h = &wouldBlockHandler{inner: syncFile{f}}
		return h
	})
	if h.refused.Load() == 0 || h.served.Load() != h.refused.Load() {
		t.Fatalf("refused %d requests on the queue thread, served %d on workers; want equal and > 0",
			h.refused.Load(), h.served.Load())
	}
}

func TestUblkMixedHandler(t *testing.T) {
	fioVerifyWith(t, storage.OpenOptions{}, func(_ ublk.Handler, f *storage.File) ublk.Handler { return mixedHandler{syncFile{f}} })
}

// offloadHandler sends large reads and writes to the blocking workers, as
// a server that copies on its workers in parallel with the queue thread.
type offloadHandler struct{ inner ublk.Handler }

func (o offloadHandler) Handle(r *ublk.Request) error {
	if r.NoWait() && r.Length >= 64<<10 && (r.Op == ublk.OpRead || r.Op == ublk.OpWrite) {
		return ublk.ErrWouldBlock
	}
	return o.inner.Handle(r)
}

// TestUblkOffloadBackend runs the pass-through in offload mode (RWF_NOWAIT
// reads on the queue thread, the rest on workers).
func TestUblkOffloadBackend(t *testing.T) {
	fioVerifyWith(t, storage.OpenOptions{}, func(b ublk.Handler, _ *storage.File) ublk.Handler { return offloadHandler{b} })
}

// TestUblkMmapBackend runs the pass-through copying through a file mapping.
func TestUblkMmapBackend(t *testing.T) {
	fioVerifyWith(t, storage.OpenOptions{Mmap: true}, nil)
}
