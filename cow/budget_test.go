package cow

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"syscall"
	"testing"

	"github.com/ublksnap/ublksnap/internal/testwait"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/storage/storagetest"
)

// waiterSeen returns a member pool of b whose kick reports, on the
// returned channel, each time an acquirer starts waiting for b.
func waiterSeen(b *BufferBudget) <-chan struct{} {
	seen := make(chan struct{}, 16)
	newDiffBufferPool(1, 0, b, func() { seen <- struct{}{} })
	return seen
}

// acquireAsync runs a blocking Acquire and returns its result channel.
func acquireAsync(ctx context.Context, b *BufferBudget, n int64) <-chan error {
	done := make(chan error, 1)
	go func() { done <- b.Acquire(ctx, n, false) }()
	return done
}

// checkStats fails unless b holds used bytes with waiting acquirers.
func checkStats(t *testing.T, b *BufferBudget, used int64, waiting int) {
	t.Helper()
	if st := b.Stats(); st.Used != used || st.Waiting != waiting {
		t.Fatalf("budget %+v; want %d bytes used, %d waiting", st, used, waiting)
	}
}

// A spent budget answers a nowait try with ErrWouldBlock and blocks an
// Acquire until a Release makes room.
func TestBudgetBlocksUntilRelease(t *testing.T) {
	b := NewBufferBudget(300)
	seen := waiterSeen(b)
	for range 3 {
		if err := b.Acquire(context.Background(), 100, true); err != nil {
			t.Fatalf("Acquire within the budget: %v", err)
		}
	}
	if err := b.Acquire(context.Background(), 100, true); !errors.Is(err, ErrWouldBlock) || !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("nowait Acquire of a spent budget = %v, want ErrWouldBlock", err)
	}
	done := acquireAsync(context.Background(), b, 100)
	<-seen
	checkStats(t, b, 300, 1)
	b.Release(100)
	if err := <-done; err != nil {
		t.Fatalf("Acquire after a Release: %v", err)
	}
	checkStats(t, b, 300, 0)
	if st := b.Stats(); st.Peak != 300 {
		t.Errorf("peak %d, want 300", st.Peak)
	}
}

// Waiters are served in turn: a small request does not pass a large one
// queued before it, nor does a nowait try.
func TestBudgetFirstComeFirstServed(t *testing.T) {
	b := NewBufferBudget(300)
	seen := waiterSeen(b)
	if err := b.Acquire(context.Background(), 300, false); err != nil {
		t.Fatal(err)
	}
	large := acquireAsync(context.Background(), b, 200)
	<-seen
	small := acquireAsync(context.Background(), b, 100)
	<-seen
	b.Release(100) // 100 free: enough for small, not for large
	checkStats(t, b, 200, 2)
	if err := b.Acquire(context.Background(), 100, true); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("nowait Acquire past waiters = %v, want ErrWouldBlock", err)
	}
	b.Release(100) // 200 free: large goes, small still does not fit
	if err := <-large; err != nil {
		t.Fatal(err)
	}
	checkStats(t, b, 300, 1)
	b.Release(200)
	if err := <-small; err != nil {
		t.Fatal(err)
	}
	checkStats(t, b, 200, 0)
}

// A waiter whose context ends gives up with the context's error, takes
// nothing, and lets those behind it go if they fit.
func TestBudgetContextCancel(t *testing.T) {
	b := NewBufferBudget(300)
	seen := waiterSeen(b)
	if err := b.Acquire(context.Background(), 200, false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	head := acquireAsync(ctx, b, 200)
	<-seen
	behind := acquireAsync(context.Background(), b, 100)
	<-seen
	checkStats(t, b, 200, 2)
	cancel()
	if err := <-head; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Acquire = %v, want context.Canceled", err)
	}
	if err := <-behind; err != nil {
		t.Fatalf("Acquire behind a cancelled waiter: %v", err)
	}
	checkStats(t, b, 300, 0)
}

// One request is admitted when nothing is held, even beyond the limit.
func TestBudgetAdmitsOneOversized(t *testing.T) {
	b := NewBufferBudget(100)
	if err := b.Acquire(context.Background(), 500, true); err != nil {
		t.Fatalf("oversized Acquire of an empty budget: %v", err)
	}
	if err := b.Acquire(context.Background(), 1, true); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("Acquire past an oversized grant = %v, want ErrWouldBlock", err)
	}
	b.Release(500)
	checkStats(t, b, 0, 0)
}

// Two pools of different buffer sizes share a budget: free buffers kept by
// one count against it and are dropped when the other waits; a pool's
// wait ends when its area closes.
func TestBudgetSharedByTwoPools(t *testing.T) {
	b := NewBufferBudget(300)
	kicks := make(chan struct{}, 16)
	small := newDiffBufferPool(100, 4, b, func() { kicks <- struct{}{} })
	large := newDiffBufferPool(200, 4, b, func() {})
	x, y := small.tryTake(), small.tryTake()
	if x == nil || y == nil {
		t.Fatal("small pool: no buffer within the budget")
	}
	small.release(x)
	small.release(y)
	if live, _ := small.stats(); live != 2 {
		t.Fatalf("small pool keeps %d buffers, want 2 free ones", live)
	}
	checkStats(t, b, 200, 0) // the free buffers hold budget
	if large.tryTake() != nil {
		t.Fatal("large pool got a buffer beyond the budget")
	}
	got, err := large.take(context.Background(), nil) // drops small's free buffers
	if err != nil || got == nil || len(got.data) != 200 {
		t.Fatalf("large take = %v, %v", got, err)
	}
	<-kicks // small's store worker was kicked
	if live, _ := small.stats(); live != 0 {
		t.Errorf("small pool still has %d buffers after a waiter starved", live)
	}
	checkStats(t, b, 200, 0)

	// small waits for the budget (100 free, but large waits before it)
	// until its area closes.
	stop := make(chan struct{})
	blocked := make(chan struct{})
	go func() {
		_, err := large.take(context.Background(), nil)
		if err != nil {
			t.Errorf("second large take: %v", err)
		}
		close(blocked)
	}()
	<-kicks
	done := make(chan error, 1)
	go func() {
		_, err := small.take(context.Background(), stop)
		done <- err
	}()
	<-kicks
	close(stop)
	if err := <-done; !errors.Is(err, errClosing) {
		t.Fatalf("take of a closing area = %v, want errClosing", err)
	}
	large.release(got) // the second large take goes
	<-blocked
	checkStats(t, b, 200, 0)
	large.close()
	small.close()
}

// While writers wait, a freed buffer goes to the first waiter if it has
// the size asked for, whatever its area, bytes and all; otherwise its
// bytes go back to the budget.
func TestBudgetHandsOverFreedBuffers(t *testing.T) {
	b := NewBufferBudget(300)
	kicks := make(chan struct{}, 16)
	a := newDiffBufferPool(100, 4, b, func() { kicks <- struct{}{} })
	other := newDiffBufferPool(100, 4, b, func() {})
	large := newDiffBufferPool(200, 4, b, func() {})
	held := []*DiffBuffer{a.tryTake(), a.tryTake(), a.tryTake()}
	take := func(p *diffBufferPool) <-chan *DiffBuffer {
		got := make(chan *DiffBuffer, 1)
		go func() {
			buf, err := p.take(context.Background(), nil)
			if err != nil {
				t.Errorf("take: %v", err)
			}
			got <- buf
		}()
		<-kicks
		return got
	}
	fromOther := take(other)
	fromLarge := take(large)
	a.release(held[0])
	if buf := <-fromOther; buf != held[0] {
		t.Error("the freed buffer was not handed to the other area's waiter")
	}
	checkStats(t, b, 300, 1)
	a.release(held[1]) // large waits first: the bytes go back
	checkStats(t, b, 200, 1)
	a.release(held[2])
	if buf := <-fromLarge; buf == nil || len(buf.data) != 200 {
		t.Fatalf("large take = %v", buf)
	}
	checkStats(t, b, 300, 0)
	for _, p := range []*diffBufferPool{a, other, large} {
		if live, _ := p.stats(); live != map[*diffBufferPool]int{a: 0, other: 1, large: 1}[p] {
			t.Errorf("pool of %d-byte buffers counts %d live", p.size, live)
		}
	}
}

// Two difference areas on one budget, under concurrent first writes to
// both originals over slow difference storages, never hold more buffer
// bytes together than the budget; their images stay right.
func TestSharedBudgetBoundsTwoAreas(t *testing.T) {
	const size = 8 << 20
	budget := NewBufferBudget(32 << 12) // 32 chunks of 4 KiB, 8 of 16 KiB
	var envs []*testEnv
	var want [][]byte
	for i, shift := range []uint{12, 14} {
		p := testParams()
		p.ChunkMinimumShift = shift
		dev := storage.NewMemDevice("orig", storage.Geometry{Size: size})
		want = append(want, fillRandom(t, dev, uint64(i)))
		ds := memStorage(t, 2*size>>storage.SectorShift, p, func(d storage.Device) storage.Device {
			f := storagetest.NewFaultDevice(d)
			f.Delay(storagetest.OpWrite, 50e3) // 50 µs: writers outrun the store
			return f
		})
		envs = append(envs, newTestEnv(t, dev, ds, p, WithBufferBudget(budget)))
	}
	var wg sync.WaitGroup
	for _, e := range envs {
		for w := range 4 {
			wg.Go(func() {
				data := make([]byte, 256<<10)
				for off := int64(w) * int64(len(data)); off < size; off += 4 * int64(len(data)) {
					if err := e.orig.Write(context.Background(), off, data, false); err != nil {
						t.Error(err)
					}
				}
			})
		}
	}
	wg.Wait()
	st := budget.Stats()
	t.Logf("budget %+v; areas %+v, %+v", st, envs[0].da.Stats(), envs[1].da.Stats())
	if st.Peak > st.Limit {
		t.Errorf("buffers of both areas peaked at %d bytes, above the budget of %d", st.Peak, st.Limit)
	}
	img := make([]byte, size)
	for i, e := range envs {
		if c, _ := e.da.Corrupted(); c {
			t.Fatalf("area %d corrupted", i)
		}
		if e.da.BufferBudget() != budget {
			t.Errorf("area %d draws on another budget", i)
		}
		if err := e.da.ReadImage(context.Background(), img, 0, false); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(img, want[i]) {
			t.Errorf("image %d differs from the original at the snapshot", i)
		}
	}
}

// A writer of one area waits while another area holds the whole budget in
// chunks it cannot store, and goes on once they are stored.
func TestSharedBudgetWaitsForTheOtherArea(t *testing.T) {
	p := testParams() // 4 KiB chunks
	budget := NewBufferBudget(64 << 12)
	var stuck *storagetest.FaultDevice
	envs := make([]*testEnv, 2)
	for i := range envs {
		dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
		ds := memStorage(t, 4096, p, func(d storage.Device) storage.Device {
			f := storagetest.NewFaultDevice(d)
			if i == 0 {
				stuck = f
			}
			return f
		})
		envs[i] = newTestEnv(t, dev, ds, p, WithBufferBudget(budget))
	}
	release := stuck.Hang(storagetest.OpWrite)
	defer release()
	// 64 chunks of area 0 fill the budget; its store hangs.
	if err := envs[0].orig.Write(context.Background(), 0, make([]byte, 64<<12), false); err != nil {
		t.Fatal(err)
	}
	if st := budget.Stats(); st.Used != st.Limit {
		t.Fatalf("budget %+v; want it spent by area 0", st)
	}
	done := make(chan error, 1)
	go func() { done <- envs[1].orig.Write(context.Background(), 0, make([]byte, 4096), false) }()
	testwait.For(t, "area 1's writer to wait for the budget", func() bool { return budget.Stats().Waiting == 1 })
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := budget.Stats(); st.Peak > st.Limit {
		t.Errorf("budget %+v: peak above the limit", st)
	}
}
