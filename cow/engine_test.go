package cow

import (
	"bytes"
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/storage/storagetest"
)

// within fails the test if fn does not return within d: a nowait call
// must never block.
func within(t *testing.T, d time.Duration, what string, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("%s blocked", what)
		return nil
	}
}

func TestNoWait(t *testing.T) {
	const size = 1 << 20
	p := testParams()
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: size})
	initial := fillRandom(t, dev, 3)
	e := newTestEnv(t, dev, memStorage(t, 4096, p, nil), p)
	ctx := context.Background()
	data := bytes.Repeat([]byte{0xee}, 8192)

	// A New chunk never touched: would block, changes nothing.
	err := within(t, time.Second, "nowait write of a new chunk", func() error { return e.orig.Write(ctx, 4096, data, true) })
	if !errors.Is(err, ErrWouldBlock) || !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("nowait write of a new chunk: %v, want ErrWouldBlock/EAGAIN", err)
	}
	if n := e.da.Stats().Chunks; n != 0 {
		t.Errorf("nowait write added %d chunks", n)
	}
	got := make([]byte, size)
	dev.ReadAt(got, 0)
	if !bytes.Equal(got, initial) {
		t.Error("nowait write changed the original")
	}
	if err := within(t, time.Second, "nowait image write", func() error { return e.da.WriteImage(ctx, data, 4096, true) }); !errors.Is(err, ErrWouldBlock) {
		t.Errorf("nowait image write of a new chunk: %v", err)
	}

	// A New chunk being loaded (its lock held): would block.
	c := e.da.chunkGet(1)
	c.lock.tryAcquire()
	err = within(t, time.Second, "nowait write of a held chunk", func() error { return e.orig.Write(ctx, 4096, data[:512], true) })
	if !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("nowait write of a held new chunk: %v", err)
	}
	if err := within(t, time.Second, "nowait image read", func() error { return e.da.ReadImage(ctx, got[:512], 4096, true) }); err != nil {
		t.Errorf("nowait image read of a held new chunk: %v (a new chunk reads from the original)", err)
	}
	// The blocking path waits for the lock, and proceeds once it is free.
	done := make(chan error, 1)
	go func() { done <- e.orig.Write(ctx, 4096, data, false) }()
	select {
	case err := <-done:
		t.Fatalf("blocking write did not wait for the held chunk: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	c.lock.release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// InMemory or Stored chunks (even held, e.g. by the store worker) need
	// no COW: nowait writes go through at once. A held chunk makes a
	// nowait image read answer would-block.
	c.lock.tryAcquire()
	if err := within(t, time.Second, "nowait write", func() error { return e.orig.Write(ctx, 4096, data[:512], true) }); err != nil {
		t.Errorf("nowait write of a copied chunk: %v", err)
	}
	if err := within(t, time.Second, "nowait image read", func() error { return e.da.ReadImage(ctx, got[:512], 4096, true) }); !errors.Is(err, ErrWouldBlock) {
		t.Errorf("nowait image read of a held chunk: %v", err)
	}
	c.lock.release()
	if err := e.da.ReadImage(ctx, got[:8192], 4096, false); err != nil || !bytes.Equal(got[:8192], initial[4096:4096+8192]) {
		t.Errorf("image after the writes: %v, equal %v", err, bytes.Equal(got[:8192], initial[4096:4096+8192]))
	}

	// WriteAsync: done at once for copied chunks, pending for new ones.
	called := make(chan error, 1)
	if err := e.orig.WriteAsync(4096, data, func(err error) { called <- err }); err != nil {
		t.Errorf("WriteAsync over copied chunks: %v", err)
	}
	if err := e.orig.WriteAsync(64<<10, data, func(err error) { called <- err }); !errors.Is(err, ErrPending) {
		t.Fatalf("WriteAsync over new chunks: %v", err)
	}
	if err := <-called; err != nil {
		t.Fatal(err)
	}
	if err := e.da.ReadImage(ctx, got[:8192], 64<<10, false); err != nil || !bytes.Equal(got[:8192], initial[64<<10:64<<10+8192]) {
		t.Errorf("image after WriteAsync: %v", err)
	}
}

// TestImageReadRace makes image reads of new chunks race with the COW of
// the same chunks: a slow original gives a writer time to copy and
// overwrite a chunk between a reader's look at the chunk map and its read.
func TestImageReadRace(t *testing.T) {
	const size = 256 << 10 // 64 chunks
	p := testParams()
	raw := storage.NewMemDevice("orig", storage.Geometry{Size: size})
	initial := fillRandom(t, raw, 5)
	for round := range 20 {
		raw.WriteAt(initial, 0)
		dev := storagetest.NewFaultDevice(raw)
		dev.Delay(storagetest.OpRead, 200*time.Microsecond)
		da, err := NewDiffArea(dev, memStorage(t, 2*size>>storage.SectorShift, p, nil), p, nil)
		if err != nil {
			t.Fatal(err)
		}
		orig := NewOriginal(dev)
		orig.SetDiffArea(da)
		var wg sync.WaitGroup
		var bad atomic.Int64
		data := bytes.Repeat([]byte{byte(round) | 0x80}, 4096)
		wg.Go(func() {
			for off := int64(0); off < size; off += 4096 {
				orig.Write(context.Background(), off, data, false)
			}
		})
		for range 3 {
			wg.Go(func() {
				buf := make([]byte, 4096)
				for off := int64(0); off < size; off += 4096 {
					if err := da.ReadImage(context.Background(), buf, off, false); err != nil || !bytes.Equal(buf, initial[off:off+4096]) {
						bad.Add(1)
					}
				}
			})
		}
		wg.Wait()
		orig.SetDiffArea(nil)
		da.Close(context.Background())
		if n := bad.Load(); n > 0 {
			t.Fatalf("round %d: %d image reads showed data written after the snapshot", round, n)
		}
	}
}

// TestBufferBound stores into a slow difference storage under a heavy
// write load: chunk buffers must stay within the bound (writers wait).
func TestBufferBound(t *testing.T) {
	const size = 16 << 20
	p := testParams()
	p.DiffBufferMemoryLimit = 32 << 12 // 32 buffers
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: size})
	var diff *storagetest.FaultDevice
	ds := memStorage(t, 2*size>>storage.SectorShift, p, func(d storage.Device) storage.Device {
		diff = storagetest.NewFaultDevice(d)
		diff.Delay(storagetest.OpWrite, 100*time.Microsecond)
		return diff
	})
	e := newTestEnv(t, dev, ds, p)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			data := make([]byte, 1<<20)
			for off := int64(w) << 20; off < size; off += 8 << 20 {
				if err := e.orig.Write(context.Background(), off, data, false); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	// Both peaks are counted exactly where they change (the pool under its
	// lock, the InMemory count with each state change), not sampled.
	st := e.da.Stats()
	t.Logf("buffers peak %d of %d, in-memory chunks at most %d, storage writes %d", st.BuffersPeak, st.BuffersLimit, st.InMemoryPeak, diff.Count(storagetest.OpWrite))
	if st.BuffersLimit != 32 || st.BuffersPeak > st.BuffersLimit || st.InMemoryPeak > st.BuffersLimit {
		t.Errorf("buffers peaked at %d (in memory %d), bound %d", st.BuffersPeak, st.InMemoryPeak, st.BuffersLimit)
	}
	if st.BuffersPeak < st.BuffersLimit {
		t.Errorf("buffers peaked at %d below the bound %d: the load did not press on the bound", st.BuffersPeak, st.BuffersLimit)
	}
	if c, _ := e.da.Corrupted(); c {
		t.Error("corrupted")
	}
}

// TestChunkMapMemory: the chunk map of a 1 TiB device grows with the
// chunks touched, not with the device.
func TestChunkMapMemory(t *testing.T) {
	const touched = 10000
	p := DefaultParams() // 256 KiB chunks: 4 Mi chunks on 1 TiB
	p.ChunkMaximumInQueue = 0
	p.FreeDiffBufferPoolSize = 0
	p.DiffBufferMemoryLimit = 4 << 18
	dev := storagetest.NewNullDevice("orig", storage.Geometry{Size: 1 << 40})
	ds := storage.New(storage.Options{})
	ds.AppendDevice(storagetest.NewNullDevice("diff", storage.Geometry{Size: 1 << 40}), []storage.Range{{Start: 0, Count: 1 << 31}})

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	e := newTestEnv(t, dev, ds, p)
	data := make([]byte, 512)
	stride := int64(1<<40) / touched &^ (1<<18 - 1)
	for i := range int64(touched) {
		if err := e.orig.Write(context.Background(), i*stride+int64(i%512)*512, data, false); err != nil {
			t.Fatal(err)
		}
	}
	waitStoreIdle(e.da)
	runtime.GC()
	runtime.ReadMemStats(&after)
	st := e.da.Stats()
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d chunks of %d KiB on 1 TiB: heap grew by %d KiB (%d bytes per chunk); %d buffers live",
		st.Chunks, st.ChunkSize>>10, heap>>10, heap/int64(st.Chunks), st.BuffersLive)
	if st.Chunks != touched || st.ChunksInState[ChunkStored] != touched {
		t.Errorf("chunks %d, stored %d; want %d", st.Chunks, st.ChunksInState[ChunkStored], touched)
	}
	if heap >= 16<<20 {
		t.Errorf("chunk map of %d chunks takes %d bytes of heap, want < 16 MiB", touched, heap)
	}
}

// TestAppendWhileWriting feeds a range-based storage from its
// low_free_space events while writers run: no corruption, right image.
func TestAppendWhileWriting(t *testing.T) {
	const size = 16 << 20
	p := testParams()
	p.DiffStorageMinimum = 4096 // 2 MiB steps, low water at 1 MiB
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: size})
	initial := fillRandom(t, dev, 11)
	ds := storage.New(storage.Options{MinimumSectors: p.DiffStorageMinimum})
	diff := storage.NewMemDevice("diff", storage.Geometry{Size: 2 * size})
	next := int64(0)
	appendSpace := func(sectors int64) {
		if err := ds.AppendDevice(diff, []storage.Range{{Start: next, Count: sectors}}); err != nil {
			t.Error(err)
		}
		next += sectors
	}
	// The creation event asks for the first space.
	ev, err := ds.Events().Wait(context.Background(), time.Second)
	if err != nil || ev.Code != storage.EventLowFreeSpace || ev.RequestedSectors != p.DiffStorageMinimum {
		t.Fatalf("creation event %+v, %v", ev, err)
	}
	appendSpace(ev.RequestedSectors)
	e := newTestEnv(t, dev, ds, p)

	ctx, cancel := context.WithCancel(context.Background())
	var lows atomic.Int64
	var feeder sync.WaitGroup
	feeder.Go(func() {
		for {
			ev, err := ds.Events().Wait(ctx, time.Second)
			if err != nil {
				return
			}
			if ev.Code == storage.EventLowFreeSpace {
				lows.Add(1)
				appendSpace(ev.RequestedSectors)
			}
		}
	})
	const writers, writeSize = 4, 64 << 10
	// A feeder in real life answers within the half-minimum of headroom:
	// the writers model that by waiting for room for all of their next
	// writes, not by pacing themselves with a clock the feeder may miss.
	waitForRoom := func() {
		for st := ds.Stats(); st.Capacity-st.Filled < writers*writeSize>>storage.SectorShift; st = ds.Stats() {
			runtime.Gosched()
		}
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			data := make([]byte, writeSize)
			for off := int64(w) * writeSize; off < size; off += writers * writeSize {
				waitForRoom()
				if err := e.orig.Write(context.Background(), off, data, false); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	waitStoreIdle(e.da)
	cancel()
	feeder.Wait()
	if c, errno := e.da.Corrupted(); c {
		t.Fatalf("corrupted: %v (storage %+v)", errno, ds.Stats())
	}
	got := make([]byte, size)
	if err := e.da.ReadImage(context.Background(), got, 0, false); err != nil || !bytes.Equal(got, initial) {
		t.Fatalf("image: %v, equal %v", err, bytes.Equal(got, initial))
	}
	t.Logf("%d low_free_space events answered; storage %+v", lows.Load(), ds.Stats())
	if lows.Load() < 6 {
		t.Errorf("only %d low_free_space events", lows.Load())
	}
}

func TestParams(t *testing.T) {
	p := DefaultParams()
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int64{"chunk_minimum_shift": 18, "chunk_maximum_count_shift": 40, "chunk_maximum_shift": 26,
		"chunk_maximum_in_queue": 16, "free_diff_buffer_pool_size": 128, "diff_storage_minimum": 2097152,
		"tracking_block_minimum_shift": 16, "tracking_block_maximum_shift": 26, "tracking_block_maximum_count": 2097152} {
		var q Params
		if err := q.Set(name, want); err != nil {
			t.Fatal(err)
		}
		if q == (Params{}) {
			t.Errorf("Set(%q) changed nothing", name)
		}
	}
	if err := p.Set("no_such_parameter", 1); !errors.Is(err, ErrInvalidParams) {
		t.Errorf("Set unknown: %v", err)
	}
	bad := p
	bad.ChunkMinimumShift = 8
	bad.ChunkMaximumInQueue = -1
	bad.DiffStorageMinimum = 100
	err := bad.Validate()
	if !errors.Is(err, ErrInvalidParams) {
		t.Fatalf("Validate bad: %v", err)
	}
	for _, name := range []string{"chunk_minimum_shift", "chunk_maximum_in_queue"} {
		if !bytes.Contains([]byte(err.Error()), []byte(name)) {
			t.Errorf("Validate does not report %s: %v", name, err)
		}
	}

	for _, tc := range []struct {
		size  int64
		iomin int
		p     func(*Params)
		shift uint
		fail  bool
	}{
		{size: 1 << 40, iomin: 512, shift: 18},
		{size: 1 << 40, iomin: 1 << 20, shift: 20},
		{size: 1 << 40, iomin: 4096, p: func(p *Params) { p.ChunkMaximumCountShift = 20 }, shift: 20},
		{size: 1 << 40, iomin: 512, p: func(p *Params) { p.ChunkMaximumCountShift = 10 }, fail: true},
		{size: 1<<20 + 512, iomin: 512, shift: 18},
	} {
		q := DefaultParams()
		if tc.p != nil {
			tc.p(&q)
		}
		shift, err := q.ChunkShift(storage.Geometry{Size: tc.size, LogicalBlockSize: 512, MinIOSize: tc.iomin})
		if (err != nil) != tc.fail || (!tc.fail && shift != tc.shift) {
			t.Errorf("ChunkShift(size %d, io_min %d) = %d, %v; want %d, fail %v", tc.size, tc.iomin, shift, err, tc.shift, tc.fail)
		}
	}

	// The last chunk is short.
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1<<20 + 1536})
	q := testParams()
	da, err := NewDiffArea(dev, memStorage(t, 4096, q, nil), q, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer da.Close(context.Background())
	if da.chunkCount != 257 || da.chunkSectors(256) != 3 || da.chunkSectors(255) != 8 {
		t.Errorf("chunks %d, last %d sectors", da.chunkCount, da.chunkSectors(256))
	}
}
