package cow

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
)

// plainDevice hides every optional interface of a device (no no-wait read,
// no FUA write), and counts what Original asks of it.
type plainDevice struct {
	dev            storage.Device
	reads, flushes atomic.Int32
}

func (d *plainDevice) ReadAt(p []byte, off int64) (int, error) {
	d.reads.Add(1)
	return d.dev.ReadAt(p, off)
}
func (d *plainDevice) WriteAt(p []byte, off int64) (int, error) { return d.dev.WriteAt(p, off) }
func (d *plainDevice) Close() error                             { return d.dev.Close() }
func (d *plainDevice) Name() string                             { return d.dev.Name() }
func (d *plainDevice) Geometry() storage.Geometry               { return d.dev.Geometry() }
func (d *plainDevice) Flush() error                             { d.flushes.Add(1); return nil }

// fuaDevice is a device with a FUA write, counted.
type fuaDevice struct {
	storage.Device
	fua atomic.Int32
}

func (d *fuaDevice) WriteAtFUA(p []byte, off int64) (int, error) {
	d.fua.Add(1)
	return d.Device.WriteAt(p, off)
}

// A no-wait read uses the device's no-wait read; a device without one
// answers would-block (EAGAIN) without reading.
func TestOriginalReadNoWait(t *testing.T) {
	mem := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	mem.WriteAt(bytes.Repeat([]byte{3}, 4096), 0)
	p := make([]byte, 4096)
	if err := NewOriginal(mem).Read(p, 0, true); err != nil || p[0] != 3 {
		t.Fatalf("no-wait read of a memory device: %v, %d", err, p[0])
	}
	plain := &plainDevice{dev: mem}
	o := NewOriginal(plain)
	if err := o.Read(p, 0, true); !errors.Is(err, ErrWouldBlock) || !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("no-wait read of a device without one: %v, want would-block", err)
	}
	if plain.reads.Load() != 0 {
		t.Fatal("the no-wait read waited for a read")
	}
	if err := o.Read(p, 0, false); err != nil || plain.reads.Load() != 1 {
		t.Fatalf("blocking read: %v", err)
	}
}

// A FUA write copies its chunks first and then uses the device's FUA write
// (no flush); on a device without one, a write and a flush.
func TestOriginalWriteFUA(t *testing.T) {
	p := testParams()
	mem := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	old := fillRandom(t, mem, 1)
	dev := &fuaDevice{Device: mem}
	e := newTestEnv(t, dev, memStorage(t, 4096, p, nil), p)
	data := bytes.Repeat([]byte{9}, 8192)
	if err := e.orig.WriteFUA(context.Background(), 4096, data, true); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("no-wait FUA write over uncopied chunks: %v, want would-block", err)
	}
	if err := e.orig.WriteFUA(context.Background(), 4096, data, false); err != nil {
		t.Fatal(err)
	}
	if dev.fua.Load() != 1 {
		t.Fatalf("%d FUA writes reached the device, want 1", dev.fua.Load())
	}
	img := make([]byte, 8192)
	if err := e.da.ReadImage(context.Background(), img, 4096, false); err != nil || !bytes.Equal(img, old[4096:12288]) {
		t.Fatalf("the image lost the data the FUA write replaced: %v", err)
	}
	plain := &plainDevice{dev: storage.NewMemDevice("plain", storage.Geometry{Size: 1 << 20})}
	if err := NewOriginal(plain).WriteFUA(context.Background(), 0, data, false); err != nil || plain.flushes.Load() != 1 {
		t.Fatalf("FUA write without FUA support: %v, %d flushes, want 1", err, plain.flushes.Load())
	}
}

// panicOriginal panics on writes to the original device itself.
type panicOriginal struct{ storage.Device }

func (panicOriginal) WriteAt([]byte, int64) (int, error) { panic("original device bug") }

// A panic on the goroutine of an asynchronous write fails only
// that request with EIO and corrupts the snapshot; the process goes on.
func TestOriginalAsyncPanic(t *testing.T) {
	p := testParams()
	mem := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	ds := memStorage(t, 4096, p, nil)
	e := newTestEnv(t, panicOriginal{mem}, ds, p)
	done := make(chan error, 1)
	if err := e.orig.WriteAsync(0, make([]byte, 4096), func(err error) { done <- err }); !errors.Is(err, ErrPending) {
		t.Fatalf("WriteAsync over an uncopied chunk: %v, want ErrPending", err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("the panicking write completed with %v, want EIO", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the panicking write never completed")
	}
	if corrupted, errno := e.da.Corrupted(); !corrupted || errno != syscall.EIO {
		t.Errorf("after the panic: corrupted %v, errno %v", corrupted, errno)
	}
	if ev, err := ds.Events().Wait(context.Background(), 5*time.Second); err != nil || ev.Code != storage.EventCorrupted {
		t.Errorf("event %+v, %v; want corrupted", ev, err)
	}
}
