package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// fakeBlockDevice is a File that says it is a block device: a regular
// file stands in for the disk, which the host tests cannot have.
func fakeBlockDevice(t *testing.T, sectors int64) *File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(sectors << SectorShift); err != nil {
		t.Fatal(err)
	}
	d := &File{f: f, fd: int(f.Fd()), dfd: -1, block: true, geo: Geometry{Size: sectors << SectorShift, LogicalBlockSize: SectorSize, PhysicalBlockSize: 4096, MinIOSize: 4096}}
	d.size.Store(d.geo.Size)
	return d
}

// fixedDevice hides the Grower of a MemDevice: a device of fixed size.
type fixedDevice struct{ Device }

// fillFixed allocates chunk-sized regions from ds until it overflows and
// checks that all lie in the first usable sectors of its one device and
// that exactly one low_free_space event came, before the device was full.
func fillFixed(t *testing.T, ds *DiffStorage, usable, chunk int64) {
	t.Helper()
	takeEvents(ds.Events())
	var n int64
	var lows []int64 // regions handed out when each low_free_space came
	for {
		r, err := ds.Alloc(chunk, SectorSize)
		if err != nil {
			if !errors.Is(err, ErrNoSpace) {
				t.Fatal(err)
			}
			break
		}
		if r.Sector+r.Count > usable {
			t.Fatalf("region %d+%d beyond the usable %d sectors", r.Sector, r.Count, usable)
		}
		n++
		for _, e := range takeEvents(ds.Events()) {
			if e.Code == EventLowFreeSpace {
				lows = append(lows, n)
			}
		}
	}
	if n != usable/chunk {
		t.Errorf("%d regions, want %d", n, usable/chunk)
	}
	if len(lows) != 1 || lows[0]*chunk >= usable {
		t.Errorf("low_free_space after regions %v of %d; want once, before the device is full", lows, n)
	}
	if st := ds.Stats(); st.Capacity != usable {
		t.Errorf("capacity %d, want %d", st.Capacity, usable)
	}
}

// A block device as storage never grows: its usable size is
// min(capacity, limit), and low_free_space comes before it is full.
func TestBlockDeviceStorageIsFixed(t *testing.T) {
	const minimum, capacity, chunk = 1024, 4096, 128
	for _, limit := range []int64{2 * capacity, capacity / 2} {
		t.Run(fmt.Sprintf("limit=%d", limit), func(t *testing.T) {
			dev := fakeBlockDevice(t, capacity)
			ds, err := NewFileDevice(dev, limit, Options{MinimumSectors: minimum, Logger: quiet})
			if err != nil {
				dev.Close()
				t.Fatal(err)
			}
			defer ds.Close()
			fillFixed(t, ds, min(capacity, limit), chunk)
		})
	}
}

// Any device that cannot grow is used the same way: a device without
// Grow, and a file opened with mmap (whose Grow fails).
func TestFixedDeviceStorage(t *testing.T) {
	const minimum, capacity, chunk = 1024, 4096, 128
	t.Run("no-grower", func(t *testing.T) {
		dev := fixedDevice{NewMemDevice("fixed", Geometry{Size: capacity << SectorShift})}
		ds, err := NewFileDevice(dev, 2*capacity, Options{MinimumSectors: minimum, Logger: quiet})
		if err != nil {
			t.Fatal(err)
		}
		defer ds.Close()
		fillFixed(t, ds, capacity, chunk)
	})
	t.Run("mmap", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "diff")
		if err := os.WriteFile(path, make([]byte, capacity<<SectorShift), 0o600); err != nil {
			t.Fatal(err)
		}
		dev, err := OpenWith(path, OpenOptions{Mmap: true})
		if err != nil {
			t.Fatal(err)
		}
		ds, err := NewFileDevice(dev, 2*capacity, Options{MinimumSectors: minimum, Logger: quiet})
		if err != nil {
			dev.Close()
			t.Fatal(err)
		}
		defer ds.Close()
		fillFixed(t, ds, capacity, chunk)
	})
}

// A file already larger than the limit is used as it is.
func TestFileLargerThanLimit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "diff")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 4096<<SectorShift); err != nil {
		t.Fatal(err)
	}
	ds, err := NewFile(path, 1024, Options{MinimumSectors: 256, Logger: quiet})
	if err != nil {
		t.Fatalf("a storage file larger than the limit: %v", err)
	}
	defer ds.Close()
	if st := ds.Stats(); st.Capacity != 4096 {
		t.Errorf("capacity %d sectors, want the file's 4096", st.Capacity)
	}
	for i := 0; i < 4096/128; i++ {
		if _, err := ds.Alloc(128, SectorSize); err != nil {
			t.Fatalf("region %d: %v", i, err)
		}
	}
	if fi, _ := os.Stat(path); fi.Size() != 4096<<SectorShift {
		t.Errorf("the file changed size to %d", fi.Size())
	}
}

// Ranges are checked without overflow and may not overlap.
func TestRangesNoOverflowNoOverlap(t *testing.T) {
	ds := New(Options{MinimumSectors: 1024, Logger: quiet})
	defer ds.Close()
	dev := NewMemDevice("m", Geometry{Size: 1 << 20, LogicalBlockSize: SectorSize})
	for _, bad := range [][]Range{
		{{Start: 1 << 62, Count: 1 << 62}},              // the sum wraps negative
		{{Start: 8, Count: 1<<63 - 1}},                  // likewise
		{{Start: 0, Count: 64}, {Start: 32, Count: 64}}, // overlap inside one request
	} {
		if err := ds.AppendDevice(dev, bad); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("AppendDevice(%v) = %v, want EINVAL", bad, err)
		}
	}
	if st := ds.Stats(); st.Capacity != 0 {
		t.Fatalf("refused ranges were added: %+v", st)
	}
	if err := ds.AppendDevice(dev, []Range{{Start: 0, Count: 256}}); err != nil {
		t.Fatal(err)
	}
	err := ds.AppendDevice(dev, []Range{{Start: 128, Count: 256}})
	if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "already in the difference storage") {
		t.Errorf("a range overlapping one already added: %v, want EINVAL", err)
	}
	if err := ds.AppendDevice(dev, []Range{{Start: 256, Count: 256}}); err != nil {
		t.Errorf("an adjacent range: %v", err)
	}
	// Two chunks never share a region.
	seen := map[int64]bool{}
	for {
		r, err := ds.Alloc(64, SectorSize)
		if err != nil {
			break
		}
		if seen[r.Sector] {
			t.Fatalf("sector %d handed out twice", r.Sector)
		}
		seen[r.Sector] = true
	}
	if len(seen) != 512/64 {
		t.Errorf("%d regions, want %d", len(seen), 512/64)
	}
}

func TestAfterClose(t *testing.T) { synctest.Test(t, testAfterClose) }

func testAfterClose(t *testing.T) {
	ds := New(Options{MinimumSectors: 1024, Logger: quiet})
	path := filepath.Join(t.TempDir(), "extra")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	woke := make(chan error, 1)
	takeEvents(ds.Events())
	go func() {
		_, err := ds.Events().Wait(context.Background(), time.Hour)
		woke <- err
	}()
	synctest.Wait() // the waiter sleeps
	ds.Close()
	select {
	case err := <-woke:
		if !errors.Is(err, ErrEventQueueClosed) {
			t.Errorf("waiter woke with %v, want ErrEventQueueClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a waiter still sleeps after Close")
	}
	if err := ds.Append(path, []Range{{Start: 0, Count: 8}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Append after Close: %v, want ErrClosed", err)
	}
	ds.Events().Post(Event{Code: EventCorrupted})
	if _, err := ds.Events().Wait(context.Background(), 0); !errors.Is(err, ErrEventQueueClosed) {
		t.Errorf("Wait after Close: %v, want ErrEventQueueClosed", err)
	}
}

// The same file appended by two paths is one device: its ranges may not
// overlap, and it is opened (and locked) once.
func TestAppendSameFileByTwoPaths(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "extra")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	alias := filepath.Join(dir, "alias")
	if err := os.Symlink(path, alias); err != nil {
		t.Fatal(err)
	}
	ds := New(Options{MinimumSectors: 1024, Logger: quiet})
	defer ds.Close()
	if err := ds.Append(path, []Range{{Start: 0, Count: 1024}}); err != nil {
		t.Fatal(err)
	}
	if err := ds.Append(alias, []Range{{Start: 512, Count: 1024}}); !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "overlaps") {
		t.Errorf("overlapping range by another path: %v, want EINVAL naming the overlap", err)
	}
	if err := ds.Append(alias, []Range{{Start: 1024, Count: 1024}}); err != nil {
		t.Errorf("the rest of the file by another path: %v", err)
	}
	if err := ds.Append(path, nil); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("the whole file again: %v, want EINVAL", err)
	}
	if st := ds.Stats(); st.Capacity != 2048 {
		t.Errorf("capacity %d sectors, want 2048", st.Capacity)
	}
}

// Concurrent appends of one new file open it once: each gets its ranges.
func TestConcurrentAppendOfOneFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "extra")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for round := range 200 {
		ds := New(Options{MinimumSectors: 1024, Logger: quiet})
		errs := make(chan error, 2)
		for i := range int64(2) {
			go func() { errs <- ds.Append(path, []Range{{Start: i * 1024, Count: 1024}}) }()
		}
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if st := ds.Stats(); st.Capacity != 2048 {
			t.Fatalf("round %d: capacity %d, want 2048", round, st.Capacity)
		}
		ds.Close()
	}
}
