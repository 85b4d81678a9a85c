package snapshot

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// countingDevice counts the calls that may block, and can panic on
// writes. It has no no-wait read: like a disk whose data is not cached.
type countingDevice struct {
	storage.Device
	reads, writes, fuaWrites, flushes atomic.Int32
	panicOnWrite                      bool
}

func (d *countingDevice) ReadAt(p []byte, off int64) (int, error) {
	d.reads.Add(1)
	return d.Device.ReadAt(p, off)
}

func (d *countingDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.panicOnWrite {
		panic("device driver bug")
	}
	d.writes.Add(1)
	return d.Device.WriteAt(p, off)
}

func (d *countingDevice) WriteAtFUA(p []byte, off int64) (int, error) {
	if d.panicOnWrite {
		panic("device driver bug")
	}
	d.fuaWrites.Add(1)
	return d.Device.WriteAt(p, off)
}

func (d *countingDevice) Flush() error {
	d.flushes.Add(1)
	return nil
}

func req(op ublk.Op, flags ublk.Flags, off int64, buf []byte, nowait bool) *ublk.Request {
	return ublk.NewRequest(op, flags, off, len(buf), buf, nowait, func(error) {})
}

// wouldBlock reports whether ublk would retry err on a worker.
func wouldBlock(err error) bool {
	return errors.Is(err, ublk.ErrWouldBlock) || errors.Is(err, syscall.EAGAIN)
}

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// Nothing that may block runs on the queue thread; FUA makes
// only its own write durable.
func TestOriginalHandlerNeverBlocksTheQueue(t *testing.T) {
	dev := &countingDevice{Device: storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})}
	h := newOriginalHandler(cow.NewOriginal(dev), newGate(), nil, quietLog)
	buf := make([]byte, 4096)
	for _, tc := range []struct {
		name string
		r    *ublk.Request
	}{
		{"read", req(ublk.OpRead, 0, 0, buf, true)},
		{"flush", req(ublk.OpFlush, 0, 0, nil, true)},
		{"FUA write", req(ublk.OpWrite, ublk.FlagFUA, 0, buf, true)},
	} {
		if err := h.Handle(tc.r); !wouldBlock(err) {
			t.Errorf("%s on the queue thread: %v, want ErrWouldBlock", tc.name, err)
		}
	}
	if n := dev.reads.Load() + dev.writes.Load() + dev.fuaWrites.Load() + dev.flushes.Load(); n != 0 {
		t.Fatalf("%d calls that may block ran on the queue thread", n)
	}
	// On a worker: the FUA write is one durable write, no flush of the file.
	if err := h.Handle(req(ublk.OpWrite, ublk.FlagFUA, 0, buf, false)); err != nil {
		t.Fatal(err)
	}
	if dev.fuaWrites.Load() != 1 || dev.flushes.Load() != 0 {
		t.Errorf("FUA write: %d FUA writes and %d flushes, want 1 and 0", dev.fuaWrites.Load(), dev.flushes.Load())
	}
	if err := h.Handle(req(ublk.OpRead, 0, 0, buf, false)); err != nil || dev.reads.Load() != 1 {
		t.Errorf("read on a worker: %v, %d reads", err, dev.reads.Load())
	}
	// A device with a no-wait read serves cached reads on the queue thread.
	mem := storage.NewMemDevice("mem", storage.Geometry{Size: 1 << 20})
	if err := newOriginalHandler(cow.NewOriginal(mem), newGate(), nil, quietLog).Handle(req(ublk.OpRead, 0, 0, buf, true)); err != nil {
		t.Errorf("no-wait read of a memory device: %v", err)
	}
}

// snapshotOf takes a snapshot of dev into an in-memory storage wrapped by
// wrap and returns the original and its area.
func snapshotOf(t *testing.T, dev storage.Device, wrap func(storage.Device) storage.Device) (*cow.Original, *cow.DiffArea, *storage.DiffStorage) {
	t.Helper()
	ds := storage.New(storage.Options{MinimumSectors: 2048, Logger: quietLog})
	var sdev storage.Device = storage.NewMemDevice("diff", storage.Geometry{Size: 4 << 20})
	if wrap != nil {
		sdev = wrap(sdev)
	}
	if err := ds.AppendDevice(sdev, []storage.Range{{Start: 0, Count: 8192}}); err != nil {
		t.Fatal(err)
	}
	ds.Events().Wait(context.Background(), 0) // the creation's low_free_space
	p := testParams()
	p.ChunkMaximumInQueue = 0
	da, err := cow.NewDiffArea(dev, ds, p, quietLog)
	if err != nil {
		t.Fatal(err)
	}
	orig := cow.NewOriginal(dev)
	orig.SetDiffArea(da)
	t.Cleanup(func() {
		orig.SetDiffArea(nil)
		da.Close(context.Background())
		ds.Close()
	})
	return orig, da, ds
}

// An image read that needs the difference storage
// or the original from disk waits on a worker, not on the queue thread.
func TestImageHandlerNeverBlocksTheQueue(t *testing.T) {
	dev := &countingDevice{Device: storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})}
	var diff *countingDevice
	orig, da, _ := snapshotOf(t, dev, func(d storage.Device) storage.Device { diff = &countingDevice{Device: d}; return diff })
	if err := orig.Write(context.Background(), 0, make([]byte, 64<<10), false); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for da.Stats().ChunksInState[cow.ChunkStored] == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	h := newImageHandler(da, nil, quietLog)
	reads := dev.reads.Load() + diff.reads.Load()
	buf := make([]byte, 4096)
	for _, off := range []int64{0, 512 << 10} { // a stored chunk, an untouched one
		if err := h.Handle(req(ublk.OpRead, 0, off, buf, true)); !wouldBlock(err) {
			t.Errorf("image read at %d on the queue thread: %v, want would-block", off, err)
		}
	}
	if n := dev.reads.Load() + diff.reads.Load() - reads; n != 0 {
		t.Errorf("%d device reads on the queue thread", n)
	}
	if err := h.Handle(req(ublk.OpRead, 0, 0, buf, false)); err != nil || !bytes.Equal(buf, make([]byte, 4096)) {
		t.Errorf("image read on a worker: %v", err)
	}
}

// A panic while serving a request fails that request with EIO
// and corrupts its snapshot; the device goes on.
func TestHandlerPanicCorruptsOnlyTheSnapshot(t *testing.T) {
	dev := &countingDevice{Device: storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})}
	orig, da, ds := snapshotOf(t, dev, nil)
	g := newGate()
	h := newOriginalHandler(orig, g, nil, quietLog)
	// Copy chunk 0 first, so the write below runs synchronously.
	if err := orig.Write(context.Background(), 0, make([]byte, 4096), false); err != nil {
		t.Fatal(err)
	}
	dev.panicOnWrite = true
	err := h.Handle(req(ublk.OpWrite, 0, 0, make([]byte, 4096), true))
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("a panicking request: %v, want EIO", err)
	}
	if corrupted, errno := da.Corrupted(); !corrupted || errno != syscall.EIO {
		t.Errorf("after the panic: corrupted %v errno %v", corrupted, errno)
	}
	if ev, err := ds.Events().Wait(context.Background(), time.Second); err != nil || ev.Code != storage.EventCorrupted {
		t.Errorf("event %+v %v, want corrupted", ev, err)
	}
	// A FUA write panics on a worker, where it is synchronous.
	if err := h.Handle(req(ublk.OpWrite, ublk.FlagFUA, 0, make([]byte, 4096), false)); !errors.Is(err, syscall.EIO) {
		t.Fatalf("a panicking FUA write: %v, want EIO", err)
	}
	if n := g.inFlight(); n != 0 {
		t.Fatalf("after the panics the gate counts %d requests in flight, want 0", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := g.Pause(ctx); err != nil {
		t.Fatalf("the panicking request stayed in the gate: %v", err)
	}
	g.Resume()
	dev.panicOnWrite = false
	if err := h.Handle(req(ublk.OpWrite, 0, 8192, make([]byte, 4096), false)); err != nil {
		t.Errorf("a later write: %v", err)
	}
}

// The hot paths allocate nothing per request: a write that needs no COW
// (no snapshot, or its chunk already copied) and a no-wait read of cached
// data on the queue thread.
func TestOriginalHandlerAllocations(t *testing.T) {
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	orig, _, _ := snapshotOf(t, dev, nil)
	if err := orig.Write(context.Background(), 0, make([]byte, 4096), false); err != nil {
		t.Fatal(err) // copies chunk 0
	}
	buf := make([]byte, 4096)
	for name, h := range map[string]ublk.Handler{
		"no snapshot":  newOriginalHandler(cow.NewOriginal(storage.NewMemDevice("plain", storage.Geometry{Size: 1 << 20})), newGate(), nil, quietLog),
		"copied chunk": newOriginalHandler(orig, newGate(), nil, quietLog),
	} {
		for _, tc := range []struct {
			op     ublk.Op
			nowait bool
		}{{ublk.OpWrite, true}, {ublk.OpWrite, false}, {ublk.OpRead, true}, {ublk.OpWriteZeroes, false}} {
			r := req(tc.op, 0, 0, buf, tc.nowait)
			if n := testing.AllocsPerRun(100, func() {
				if err := h.Handle(r); err != nil {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("%s: %v (nowait %v): %v allocations per request, want 0", name, tc.op, tc.nowait, n)
			}
		}
	}
}

// The ring path allocates nothing per request either: describing a read,
// a FUA write, a flush, a discard and a write-zeroes of a filtered device
// over a file, and finishing them.
func TestOriginalHandlerRingAllocations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := storage.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := newOriginalHandler(cow.NewOriginal(f), newGate(), nil, quietLog)
	fin := h.(ublk.Finisher)
	buf := make([]byte, 4096)
	for _, tc := range []struct {
		op    ublk.Op
		flags ublk.Flags
	}{{ublk.OpRead, 0}, {ublk.OpWrite, ublk.FlagFUA}, {ublk.OpFlush, 0}, {ublk.OpDiscard, 0}, {ublk.OpWriteZeroes, 0}} {
		r := req(tc.op, tc.flags, 0, buf, true)
		if n := testing.AllocsPerRun(100, func() {
			r.ClearIO()
			if err := h.Handle(r); err != nil {
				t.Fatal(err)
			}
			if len(r.IOs()) == 0 {
				t.Fatalf("%v: no ring I/O described", tc.op)
			}
			if err := fin.Finish(r, nil); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Errorf("%v: %v allocations per request, want 0", tc.op, n)
		}
	}
}

// fileDevice opens a temporary file of n bytes of data (random when data
// is nil) as a storage.File and returns it with its contents.
func fileDevice(t *testing.T, n int, random bool) (*storage.File, []byte) {
	t.Helper()
	data := make([]byte, n)
	if random {
		rand.New(rand.NewSource(int64(n))).Read(data)
	}
	path := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := storage.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, data
}

// A read or write that O_DIRECT refuses (here: memory off the 512-byte
// alignment, which the block layer never sends) is served again through
// the page cache instead of failing, on the filtered device and on its
// image; data a COW copied is still the image's.
func TestDirectFallback(t *testing.T) {
	path := filepath.Join(t.TempDir(), "backing")
	want := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(want)
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := storage.OpenWith(path, storage.OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !f.DirectIO() {
		t.Skipf("the test directory's file system has no direct I/O: %v", f.DirectIOError())
	}
	files := backingFiles(f)
	orig, da, _ := snapshotOf(t, f, nil)
	unaligned := func(n int) []byte { return make([]byte, n+1)[1:] }

	h := newOriginalHandler(orig, newGate(), nil, quietLog)
	w := unaligned(8192)
	rand.New(rand.NewSource(2)).Read(w)
	if err := ublk.Run(h, req(ublk.OpWrite, 0, 64<<10, w, true), files); err != nil {
		t.Fatalf("unaligned write: %v", err)
	}
	r := req(ublk.OpRead, 0, 64<<10, unaligned(8192), true)
	if err := ublk.Run(h, r, files); err != nil || !bytes.Equal(r.Buf, w) {
		t.Fatalf("unaligned read of the write: %v", err)
	}
	if io := r.IOs(); len(io) != 1 {
		t.Fatalf("%d IOs described for the read, want 1", len(io))
	} else if file, _, _, _ := io[0].Data(); file != ublk.RegisteredFile(1) {
		t.Errorf("the read went to %v, want the cached descriptor", file)
	}

	img := newImageHandler(da, nil, quietLog)
	for _, off := range []int64{64 << 10, 512 << 10} { // copied, untouched
		r := req(ublk.OpRead, 0, off, unaligned(8192), true)
		if err := ublk.Run(img, r, files); err != nil || !bytes.Equal(r.Buf, want[off:off+8192]) {
			t.Errorf("unaligned image read at %d: %v, or not the snapshot's data", off, err)
		}
	}
}

// Image reads over files go through the ring: each chunk's part from the
// original, from its region in the difference storage, or from memory,
// split inside one request; a read whose original chunk is copied while
// it is in flight is served again, and then gives the snapshot's data.
func TestImageHandlerRingReads(t *testing.T) {
	const chunk = 64 << 10
	origFile, want := fileDevice(t, 1<<20, true)
	orig, da, _ := snapshotOf(t, origFile, func(storage.Device) storage.Device {
		f, _ := fileDevice(t, 4<<20, false)
		return f
	})
	ctx := context.Background()
	// Chunks 1 and 2 copied (and stored, or held in memory), 0 and 3 not.
	for _, c := range []int64{1, 2} {
		if err := orig.Write(ctx, c*chunk, make([]byte, 4096), false); err != nil {
			t.Fatal(err)
		}
	}
	h := newImageHandler(da, nil, quietLog)
	files := backingFiles(origFile)
	for _, tc := range []struct{ off, n int64 }{{0, 4096}, {chunk - 512, 3 * chunk}, {chunk, chunk}, {3 * chunk, 8192}} {
		r := req(ublk.OpRead, 0, tc.off, make([]byte, tc.n), true)
		if err := ublk.Run(h, r, files); err != nil {
			t.Fatalf("read %d at %d: %v", tc.n, tc.off, err)
		}
		if !bytes.Equal(r.Buf, want[tc.off:tc.off+tc.n]) {
			t.Errorf("read %d at %d: not the snapshot's data", tc.n, tc.off)
		}
		if len(r.IOs()) == 0 && tc.off != chunk {
			t.Errorf("read %d at %d: no ring I/O described", tc.n, tc.off)
		}
	}

	// Chunk 3 is copied while a read of it is in flight.
	r := req(ublk.OpRead, 0, 3*chunk, make([]byte, 4096), true)
	if err := h.Handle(r); err != nil || len(r.IOs()) != 1 {
		t.Fatalf("Handle: %v, %d IOs", err, len(r.IOs()))
	}
	if err := orig.Write(ctx, 3*chunk, make([]byte, 4096), false); err != nil {
		t.Fatal(err)
	}
	if err := h.(ublk.Finisher).Finish(r, nil); !errors.Is(err, ublk.ErrWouldBlock) {
		t.Fatalf("Finish after the chunk was copied: %v, want ErrWouldBlock (serve again)", err)
	}
	r = req(ublk.OpRead, 0, 3*chunk, make([]byte, 4096), true)
	if err := ublk.Run(h, r, files); err != nil || !bytes.Equal(r.Buf, want[3*chunk:3*chunk+4096]) {
		t.Fatalf("read again: %v, snapshot's data %v", err, bytes.Equal(r.Buf, want[3*chunk:3*chunk+4096]))
	}
	// Every planned read left the area: it closes.
	orig.SetDiffArea(nil)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := da.Close(cctx); err != nil {
		t.Fatalf("close the area after the reads: %v", err)
	}
}
