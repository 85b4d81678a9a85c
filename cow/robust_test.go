package cow

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/internal/testwait"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/storage/storagetest"
)

// A panic in the store worker corrupts the snapshot, not the process, and
// never the original.
func TestStoreWorkerPanic(t *testing.T) {
	p := testParams()
	p.ChunkMaximumInQueue = 0 // store at once
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	ds := memStorage(t, 4096, p, func(d storage.Device) storage.Device {
		f := storagetest.NewFaultDevice(d)
		f.Panic(storagetest.OpWrite, "storage device bug")
		return f
	})
	e := newTestEnv(t, dev, ds, p)
	data := bytes.Repeat([]byte{7}, 8192)
	if err := e.orig.Write(context.Background(), 0, data, false); err != nil {
		t.Fatalf("write to the original: %v", err)
	}
	ev, err := ds.Events().Wait(context.Background(), 5*time.Second)
	if err != nil || ev.Code != storage.EventCorrupted || ev.Errno != syscall.EIO {
		t.Fatalf("event %+v, %v; want corrupted with EIO", ev, err)
	}
	if corrupted, errno := e.da.Corrupted(); !corrupted || errno != syscall.EIO {
		t.Fatalf("Corrupted() = %v, %v", corrupted, errno)
	}
	if err := e.da.ReadImage(context.Background(), make([]byte, 4096), 0, false); !errors.Is(err, ErrCorrupted) {
		t.Errorf("image read after the panic: %v, want ErrCorrupted", err)
	}
	got := make([]byte, len(data))
	dev.ReadAt(got, 0)
	if !bytes.Equal(got, data) {
		t.Error("the original lost the write")
	}
	if err := e.orig.Write(context.Background(), 1<<19, data, false); err != nil {
		t.Errorf("a later write to the original: %v", err)
	}
}

// Close of an area whose difference storage hangs returns within its
// bound; the stuck store frees nothing under anyone when it comes back.
func TestCloseWithHungStorage(t *testing.T) {
	p := testParams()
	p.ChunkMaximumInQueue = 0
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	var diff *storagetest.FaultDevice
	ds := memStorage(t, 4096, p, func(d storage.Device) storage.Device {
		diff = storagetest.NewFaultDevice(d)
		return diff
	})
	release := diff.Hang(storagetest.OpWrite)
	defer release()
	da, err := NewDiffArea(dev, ds, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	orig := NewOriginal(dev)
	orig.SetDiffArea(da)
	if err := orig.Write(context.Background(), 0, make([]byte, 4096), false); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, "the store to hang", func() bool { return diff.Hanging(storagetest.OpWrite) == 1 })
	// An image reader waits for the chunk the stuck store holds.
	read := make(chan error, 1)
	go func() { read <- da.ReadImage(context.Background(), make([]byte, 4096), 0, false) }()

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = da.Close(ctx)
	if !errors.Is(err, ErrCloseTimeout) {
		t.Fatalf("Close with a hung storage: %v, want ErrCloseTimeout", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Close took %v with a 200ms bound", took)
	}
	if corrupted, errno := da.Corrupted(); !corrupted || errno != syscall.ETIMEDOUT {
		t.Errorf("after the timed-out close: corrupted %v errno %v, want ETIMEDOUT", corrupted, errno)
	}
	select {
	case err := <-read:
		if err == nil {
			t.Error("the image read waiting on the hung chunk succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the image reader still waits after Close")
	}
	// Image I/O arriving now fails at once with EIO; the original is
	// written without COW, also while the area is still installed.
	if err := da.ReadImage(context.Background(), make([]byte, 4096), 8192, false); !errors.Is(err, syscall.EIO) {
		t.Errorf("image read after the timed-out close: %v, want EIO", err)
	}
	if err := orig.Write(context.Background(), 16384, make([]byte, 4096), false); err != nil {
		t.Errorf("original write with the closed area installed: %v", err)
	}
	orig.SetDiffArea(nil)
	if err := orig.Write(context.Background(), 8192, make([]byte, 4096), false); err != nil {
		t.Error(err)
	}
	release() // the disk comes back; the area frees itself
	testwait.For(t, "the buffers to be freed", func() bool { n, _ := da.buffers.stats(); return n == 0 })
	ds.Close()
}

// An area with nothing in flight closes cleanly even when the context is
// already over (the caller shares one bound among several areas): it is
// neither corrupted nor reported as timed out.
func TestCloseIdleWithExpiredContext(t *testing.T) {
	p := testParams()
	for i := range 20 {
		dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
		ds := memStorage(t, 4096, p, nil)
		da, err := NewDiffArea(dev, ds, p, nil)
		if err != nil {
			t.Fatal(err)
		}
		orig := NewOriginal(dev)
		orig.SetDiffArea(da)
		if err := orig.Write(context.Background(), 0, make([]byte, 8192), false); err != nil {
			t.Fatal(err)
		}
		orig.SetDiffArea(nil)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := da.Close(ctx); err != nil {
			t.Fatalf("round %d: Close of an idle area: %v", i, err)
		}
		if c, errno := da.Corrupted(); c {
			t.Fatalf("round %d: an idle area corrupted by Close (%v)", i, errno)
		}
		ds.Close()
	}
}
