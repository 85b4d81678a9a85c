package storage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

// takeEvents takes every event posted so far.
func takeEvents(q *EventQueue) []Event {
	var evs []Event
	for {
		e, err := q.Wait(context.Background(), 0)
		if err != nil {
			return evs
		}
		evs = append(evs, e)
	}
}

func TestLowFreeSpaceThresholds(t *testing.T) {
	const minimum = 64 // low water at 32 free sectors
	ds := New(Options{MinimumSectors: minimum})
	defer ds.Close()
	evs := takeEvents(ds.Events())
	if len(evs) != 1 || evs[0].Code != EventLowFreeSpace || evs[0].RequestedSectors != minimum {
		t.Fatalf("creation events %+v, want one low_free_space of %d", evs, minimum)
	}
	dev := NewMemDevice("diff", Geometry{Size: 1 << 20})
	if err := ds.AppendDevice(dev, []Range{{Start: 0, Count: 128}}); err != nil {
		t.Fatal(err)
	}
	// 128 free: each 8-sector region leaves 8 fewer; the 12th leaves 32.
	for i := 1; i <= 15; i++ {
		if _, err := ds.Alloc(8, 512); err != nil {
			t.Fatal(err)
		}
		n := len(takeEvents(ds.Events()))
		if want := map[bool]int{true: 1, false: 0}[i == 12]; n != want {
			t.Fatalf("after region %d (free %d): %d events, want %d", i, 128-8*i, n, want)
		}
	}
	// Appending above the mark re-arms it; the next crossing is reported.
	if err := ds.AppendDevice(dev, []Range{{Start: 1024, Count: 64}}); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 9; i++ { // 72 free: the 5th region leaves 32
		if _, err := ds.Alloc(8, 512); err != nil {
			t.Fatal(err)
		}
		if n := len(takeEvents(ds.Events())); n != map[bool]int{true: 1, false: 0}[i == 5] {
			t.Fatalf("after appended region %d: %d events", i, n)
		}
	}
	st := ds.Stats()
	if st.Capacity != 192 || st.Filled != 192 || st.Requested != 3*minimum {
		t.Errorf("stats %+v", st)
	}
	// Exhausted: overflow, for good.
	if _, err := ds.Alloc(8, 512); !errors.Is(err, ErrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("alloc on a full storage: %v", err)
	}
	ds.AppendDevice(dev, []Range{{Start: 2048, Count: 64}})
	if _, err := ds.Alloc(8, 512); !errors.Is(err, ErrNoSpace) || !ds.Stats().Overflow {
		t.Fatalf("alloc after overflow: %v", err)
	}
}

func TestAllocFirstFit(t *testing.T) {
	ds := New(Options{MinimumSectors: 16})
	defer ds.Close()
	a := NewMemDevice("a", Geometry{Size: 1 << 20})
	b := NewMemDevice("b", Geometry{Size: 1 << 20})
	ds.AppendDevice(a, []Range{{Start: 100, Count: 20}})
	ds.AppendDevice(b, []Range{{Start: 8, Count: 16}})
	var got []string
	for range 4 {
		r, err := ds.Alloc(8, 512)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, r.Dev.Name()+":"+strconv.FormatInt(r.Sector, 10))
	}
	if s := strings.Join(got, " "); s != "a:100 a:108 b:8 b:16" {
		t.Errorf("regions %s", s)
	}
	if st := ds.Stats(); st.Filled != 36 || st.Capacity != 36 {
		t.Errorf("stats %+v: the 4-sector tail of a must count as filled", st)
	}
	// Storage with larger logical blocks than the original is refused.
	big := NewMemDevice("big", Geometry{Size: 1 << 20, LogicalBlockSize: 4096})
	ds.AppendDevice(big, []Range{{Start: 0, Count: 64}})
	if _, err := ds.Alloc(8, 512); !errors.Is(err, ErrBlockSize) || !errors.Is(err, syscall.ENOTBLK) {
		t.Errorf("alloc on 4K storage for a 512 device: %v", err)
	}
	if r, err := ds.Alloc(8, 4096); err != nil || r.Dev != big {
		t.Errorf("alloc on 4K storage for a 4K device: %v", err)
	}
	// Bad ranges are all reported.
	err := ds.AppendDevice(big, []Range{{Start: -1, Count: 8}, {Start: 1, Count: 8}, {Start: 0, Count: 1 << 20}})
	if !errors.Is(err, syscall.EINVAL) || strings.Count(err.Error(), "range ") != 3 {
		t.Errorf("bad ranges: %v", err)
	}
}

// fdsInto returns the open descriptors of the process that point into dir.
func fdsInto(t *testing.T, dir string) []string {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	var out []string
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(l, dir+"/") {
			out = append(out, l)
		}
	}
	return out
}

func TestDirectoryStorageLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	ds, err := NewFile(dir, 1<<20, Options{MinimumSectors: 2048})
	if err != nil {
		t.Fatal(err)
	}
	r, err := ds.Alloc(512, 512)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(make([]byte, 256<<10), 0); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("the storage file has a name: %v", ents)
	}
	if fds := fdsInto(t, dir); len(fds) != 1 {
		t.Errorf("open files in the directory: %v", fds)
	}
	if err := ds.Close(); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
	if fds := fdsInto(t, dir); len(fds) != 0 {
		t.Errorf("still open after Close: %v", fds)
	}
}

func TestGrowableFileLimit(t *testing.T) {
	const (
		minimum = 2048 // 1 MiB steps
		limit   = 5*minimum + 512
	)
	path := filepath.Join(t.TempDir(), "diff")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ds, err := NewFile(path, limit, Options{MinimumSectors: minimum})
	if err != nil {
		t.Fatal(err)
	}
	defer ds.Close()
	chunk := make([]byte, 64<<10)
	var regions int
	for {
		r, err := ds.Alloc(128, 512)
		if errors.Is(err, ErrNoSpace) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		regions++
		if err := r.WriteAt(chunk, 0); err != nil {
			t.Fatal(err)
		}
		if st, _ := os.Stat(path); st.Size() > limit<<SectorShift {
			t.Fatalf("file of %d bytes exceeds the limit of %d", st.Size(), int64(limit)<<SectorShift)
		}
	}
	if regions != limit/128 {
		t.Errorf("%d regions fit, want %d", regions, limit/128)
	}
	deadline := time.Now().Add(5 * time.Second)
	for ds.Stats().Capacity < limit && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	st, _ := os.Stat(path)
	if st.Size() != limit<<SectorShift || ds.Stats().Capacity != limit {
		t.Errorf("file %d bytes, stats %+v; want the limit %d sectors", st.Size(), ds.Stats(), limit)
	}
	// Growing below the limit is silent; at the limit the file posts
	// no_space once and asks for more space (to be appended) once.
	var noSpace, lowSpace int
	for _, e := range takeEvents(ds.Events()) {
		switch e.Code {
		case EventNoSpace:
			noSpace++
		case EventLowFreeSpace:
			lowSpace++
		}
	}
	if noSpace != 1 || lowSpace != 1 {
		t.Errorf("%d no_space and %d low_free_space events, want 1 of each", noSpace, lowSpace)
	}
	if _, err := NewFile(path, limit-8, Options{MinimumSectors: minimum}); !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Errorf("reopen above the limit: %v", err)
	}
}

func TestEventWaitTimeout(t *testing.T) { synctest.Test(t, testEventWaitTimeout) }

// testEventWaitTimeout runs in a bubble: its clock moves only when every
// goroutine waits, so the times it checks are exact.
func testEventWaitTimeout(t *testing.T) {
	q := NewEventQueue()
	start := time.Now()
	if _, err := q.Wait(context.Background(), 50*time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("Wait on an empty queue: %v", err)
	}
	if d := time.Since(start); d != 50*time.Millisecond {
		t.Errorf("a 50 ms wait took %v", d)
	}
	go func() {
		time.Sleep(20 * time.Millisecond)
		q.Post(Event{Code: EventCorrupted, Device: "x", Errno: syscall.EIO})
	}()
	start = time.Now()
	e, err := q.Wait(context.Background(), 10*time.Second)
	if err != nil || e.Code != EventCorrupted || e.Time.IsZero() {
		t.Fatalf("Wait: %+v, %v", e, err)
	}
	if d := time.Since(start); d != 20*time.Millisecond {
		t.Errorf("a wait for an event posted after 20 ms took %v", d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := q.Wait(ctx, 10*time.Second); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait with a cancelled context: %v", err)
	}
}

func TestFileDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := Open(path); err == nil {
		t.Error("a second exclusive open succeeded")
	}
	g := f.Geometry()
	if g.Size != 1<<20 || g.LogicalBlockSize != 512 {
		t.Errorf("geometry %+v", g)
	}
	data := []byte(strings.Repeat("x", 8192))
	if _, err := f.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if err := WriteZeroes(f, 4096, 4096); err != nil {
		t.Fatal(err)
	}
	if err := Discard(f, 8192, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	f.ReadAt(got, 4096)
	for i, b := range got {
		if b != 0 {
			t.Fatalf("byte %d is %q after zeroing and discard", 4096+i, b)
		}
	}
	if err := Flush(f); err != nil {
		t.Error(err)
	}
}

// TestAllocDuringGrowth holds a storage file in the middle of a growth (its
// fallocate lock taken, as while fallocate runs) and allocates every
// sector planned meanwhile: allocation takes what is there and never waits
// for the growth.
func TestAllocDuringGrowth(t *testing.T) {
	const minimum = 2048 // 1 MiB steps
	path := filepath.Join(t.TempDir(), "diff")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := NewFileDevice(f, 8*minimum, Options{MinimumSectors: minimum})
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	defer ds.Close()
	f.growMu.Lock() // a fallocate that does not end until the test says so
	growing := true
	defer func() {
		if growing {
			f.growMu.Unlock()
		}
	}()
	done := make(chan error, 1)
	go func() {
		// Past the low-water mark a growth starts (and blocks), planning
		// one more step, which is allocated as well.
		for range 2 * minimum / 128 {
			r, err := ds.Alloc(128, 512)
			if err == nil {
				err = r.WriteAt(make([]byte, 512), 0)
			}
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("allocation waited for the growth of the storage file")
	}
	f.growMu.Unlock()
	growing = false
	if st := ds.Stats(); st.Filled != 2*minimum || st.Overflow {
		t.Errorf("stats %+v, want %d sectors filled and no overflow", st, 2*minimum)
	}
}
