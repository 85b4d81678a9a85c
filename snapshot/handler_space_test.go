package snapshot

import (
	"sync/atomic"
	"testing"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// spaceDevice counts discards and write-zeroes: fallocate, BLKDISCARD
// and BLKZEROOUT on a real device, which wait for the file system or the
// disk (a 1 GiB write-zeroes on tmpfs takes about half a second).
type spaceDevice struct {
	*storage.MemDevice
	discards, zeroes atomic.Int32
}

func (d *spaceDevice) Discard(off, n int64) error {
	d.discards.Add(1)
	return d.MemDevice.Discard(off, n)
}

func (d *spaceDevice) WriteZeroes(off, n int64) error {
	d.zeroes.Add(1)
	return d.MemDevice.WriteZeroes(off, n)
}

// Discard and write-zeroes on the queue thread answer
// would-block without touching the device, and a worker serves them.
func TestOriginalHandlerSpaceOpsOnWorkers(t *testing.T) {
	dev := &spaceDevice{MemDevice: storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})}
	h := newOriginalHandler(cow.NewOriginal(dev), newGate(), nil, quietLog)
	for _, op := range []ublk.Op{ublk.OpDiscard, ublk.OpWriteZeroes} {
		for _, flags := range []ublk.Flags{0, ublk.FlagNoUnmap} {
			r := ublk.NewRequest(op, flags, 0, 64<<10, nil, true, func(error) {})
			if err := h.Handle(r); !wouldBlock(err) {
				t.Errorf("%v (flags %#x) on the queue thread: %v, want would-block", op, flags, err)
			}
		}
	}
	if n := dev.discards.Load() + dev.zeroes.Load(); n != 0 {
		t.Fatalf("%d discards or write-zeroes ran on the queue thread", n)
	}
	for _, op := range []ublk.Op{ublk.OpDiscard, ublk.OpWriteZeroes} {
		if err := h.Handle(ublk.NewRequest(op, 0, 0, 64<<10, nil, false, func(error) {})); err != nil {
			t.Errorf("%v on a worker: %v", op, err)
		}
	}
	if dev.discards.Load() != 1 || dev.zeroes.Load() != 1 {
		t.Errorf("on workers: %d discards and %d write-zeroes, want 1 and 1", dev.discards.Load(), dev.zeroes.Load())
	}
}
