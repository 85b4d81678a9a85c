package cow

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/storage/storagetest"
)

// drainEvents takes every event posted so far.
func drainEvents(ds *storage.DiffStorage) []storage.Event {
	var evs []storage.Event
	for {
		e, err := ds.Events().Wait(context.Background(), 0)
		if err != nil {
			return evs
		}
		evs = append(evs, e)
	}
}

// checkCorruptedOutcome checks the outcome every COW failure must have:
// exactly one corrupted event with errno, the original holding the newest
// data, and every image read failing with EIO.
func checkCorruptedOutcome(t *testing.T, e *testEnv, raw storage.Device, want []byte, errno syscall.Errno) {
	t.Helper()
	var corrupted []storage.Event
	for _, ev := range drainEvents(e.ds) {
		if ev.Code == storage.EventCorrupted {
			corrupted = append(corrupted, ev)
		}
	}
	if len(corrupted) != 1 {
		t.Fatalf("got %d corrupted events, want 1: %+v", len(corrupted), corrupted)
	}
	if ev := corrupted[0]; ev.Errno != errno || ev.Device != e.dev.Name() {
		t.Errorf("corrupted event %+v, want device %q errno %v", ev, e.dev.Name(), errno)
	}
	if c, got := e.da.Corrupted(); !c || got != errno {
		t.Errorf("Corrupted() = %v, %v; want true, %v", c, got, errno)
	}
	got := make([]byte, len(want))
	if _, err := raw.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Errorf("original differs from the data written at byte %d", i)
	}
	p := make([]byte, 4096)
	for off := int64(0); off < int64(len(want)); off += 256 << 10 {
		err := e.da.ReadImage(context.Background(), p, off, false)
		if !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrCorrupted) {
			t.Fatalf("image read at %d: %v, want EIO", off, err)
		}
	}
	if err := e.da.WriteImage(context.Background(), p, 0, false); !errors.Is(err, syscall.EIO) {
		t.Errorf("image write: %v, want EIO", err)
	}
}

// writeAll writes the device sequentially in 1 MiB requests of fresh data,
// twice, and returns what the original must hold; every write must succeed.
func writeAll(t *testing.T, e *testEnv, size int64) []byte {
	t.Helper()
	want := make([]byte, size)
	for pass := range 2 {
		for off := int64(0); off < size; off += 1 << 20 {
			p := bytes.Repeat([]byte{byte(off>>20) ^ byte(pass*0x5a) | 1}, int(min(1<<20, size-off)))
			if err := e.orig.Write(context.Background(), off, p, false); err != nil {
				t.Fatalf("original write at %d: %v", off, err)
			}
			copy(want[off:], p)
		}
	}
	return want
}

func TestOverflow(t *testing.T) {
	const size = 8 << 20
	p := testParams()
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: size})
	fillRandom(t, dev, 7)
	ds := memStorage(t, 1<<20>>storage.SectorShift, p, nil) // room for 256 of 2048 chunks
	e := newTestEnv(t, dev, ds, p)
	want := writeAll(t, e, size)
	waitStoreIdle(e.da)
	checkCorruptedOutcome(t, e, dev, want, syscall.ENOSPC)
	if !ds.Stats().Overflow {
		t.Error("storage overflow flag not set")
	}
}

func TestFaults(t *testing.T) {
	const size = 8 << 20
	for _, tc := range []struct {
		name string
		// inject sets up the fault on the original or the storage device.
		inject func(orig, diff *storagetest.FaultDevice)
		// storedFirst stores some chunks before the fault matters and
		// reads them from the image to hit it.
		storedFirst bool
	}{
		{name: "diff-storage-write", inject: func(_, diff *storagetest.FaultDevice) {
			diff.Fail(storagetest.OpWrite, 20, syscall.EIO)
		}},
		{name: "diff-storage-read", storedFirst: true, inject: func(_, diff *storagetest.FaultDevice) {
			diff.Fail(storagetest.OpRead, 0, syscall.EIO)
		}},
		{name: "original-read", inject: func(orig, _ *storagetest.FaultDevice) {
			orig.Fail(storagetest.OpRead, 20, syscall.EIO)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := testParams()
			raw := storage.NewMemDevice("orig", storage.Geometry{Size: size})
			fillRandom(t, raw, 9)
			orig := storagetest.NewFaultDevice(raw)
			var diff *storagetest.FaultDevice
			ds := memStorage(t, 2*size>>storage.SectorShift, p, func(d storage.Device) storage.Device {
				diff = storagetest.NewFaultDevice(d)
				return diff
			})
			e := newTestEnv(t, orig, ds, p)
			if tc.storedFirst {
				// Store chunks, then make reading them back fail.
				writeAll(t, e, size)
				tc.inject(orig, diff)
				buf := make([]byte, 4096)
				for off := int64(0); off < size; off += 4096 {
					if err := e.da.ReadImage(context.Background(), buf, off, false); err != nil {
						if !errors.Is(err, syscall.EIO) {
							t.Fatalf("image read: %v, want EIO", err)
						}
						break
					}
				}
			} else {
				tc.inject(orig, diff)
			}
			want := writeAll(t, e, size)
			waitStoreIdle(e.da)
			checkCorruptedOutcome(t, e, raw, want, syscall.EIO)
		})
	}
}
