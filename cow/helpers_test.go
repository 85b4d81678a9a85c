package cow

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
)

// testParams returns parameters with 4 KiB chunks, so that tests touch
// thousands of chunks cheaply, and a small store queue and buffer bound.
func testParams() Params {
	p := DefaultParams()
	p.ChunkMinimumShift = 12
	p.ChunkMaximumInQueue = 4
	p.FreeDiffBufferPoolSize = 8
	p.DiffStorageMinimum = 2048 // 1 MiB
	p.DiffBufferMemoryLimit = 64 << 12
	return p
}

// testEnv is an original device with a snapshot.
type testEnv struct {
	orig *Original
	dev  storage.Device
	ds   *storage.DiffStorage
	da   *DiffArea
}

// newTestEnv takes a snapshot of dev into ds and registers cleanup.
func newTestEnv(t testing.TB, dev storage.Device, ds *storage.DiffStorage, p Params, opts ...Option) *testEnv {
	t.Helper()
	da, err := NewDiffArea(dev, ds, p, nil, opts...)
	if err != nil {
		t.Fatalf("NewDiffArea: %v", err)
	}
	e := &testEnv{orig: NewOriginal(dev), dev: dev, ds: ds, da: da}
	e.orig.SetDiffArea(da)
	t.Cleanup(func() {
		e.orig.SetDiffArea(nil)
		da.Close(context.Background())
		ds.Close()
	})
	return e
}

// memStorage returns a difference storage of one in-memory range of
// sectors, wrapped by wrap if not nil.
func memStorage(t testing.TB, sectors int64, p Params, wrap func(storage.Device) storage.Device) *storage.DiffStorage {
	t.Helper()
	ds := storage.New(storage.Options{MinimumSectors: p.DiffStorageMinimum})
	var dev storage.Device = storage.NewMemDevice("diff", storage.Geometry{Size: sectors << storage.SectorShift})
	if wrap != nil {
		dev = wrap(dev)
	}
	if err := ds.AppendDevice(dev, []storage.Range{{Start: 0, Count: sectors}}); err != nil {
		t.Fatalf("AppendDevice: %v", err)
	}
	// Drop the creation event so tests see only their own.
	ds.Events().Wait(context.Background(), 0)
	return ds
}

// fillRandom writes pseudo-random data over the whole device and returns a
// copy of it.
func fillRandom(t testing.TB, dev storage.Device, seed uint64) []byte {
	t.Helper()
	data := make([]byte, dev.Geometry().Size)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := 0; i+8 <= len(data); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			data[i+j] = byte(v >> (8 * j))
		}
	}
	if _, err := dev.WriteAt(data, 0); err != nil {
		t.Fatalf("fill: %v", err)
	}
	return data
}

// rangeLocks serialises overlapping requests to one device in a test, in
// stripes of stripe bytes locked in ascending order.
type rangeLocks struct {
	stripe int64
	mu     []sync.Mutex
}

func newRangeLocks(size, stripe int64) *rangeLocks {
	return &rangeLocks{stripe: stripe, mu: make([]sync.Mutex, (size+stripe-1)/stripe)}
}

func (l *rangeLocks) lock(off, n int64) {
	for i := off / l.stripe; i <= (off+n-1)/l.stripe; i++ {
		l.mu[i].Lock()
	}
}

func (l *rangeLocks) unlock(off, n int64) {
	for i := off / l.stripe; i <= (off+n-1)/l.stripe; i++ {
		l.mu[i].Unlock()
	}
}

// waitStoreIdle waits until no store worker is running.
func waitStoreIdle(da *DiffArea) {
	for {
		da.storeMu.Lock()
		busy := da.storeBusy > 0
		da.storeMu.Unlock()
		if !busy {
			return
		}
		time.Sleep(time.Millisecond)
	}
}
