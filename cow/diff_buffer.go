package cow

import (
	"context"
	"sync"
)

// DiffBuffer holds one chunk's data in memory (blksnap's struct
// diff_buffer). Its length is the full chunk size; a short last chunk uses
// a prefix.
type DiffBuffer struct {
	data []byte
}

// diffBufferPool hands out the DiffBuffers of one difference area. Every
// live buffer (in use or free) holds size bytes of budget, which may be
// shared with other areas: take waits when the budget is spent. Free
// buffers are kept for reuse, up to keep, as blksnap keeps up to
// free_diff_buffer_pool_size, but only while nobody waits for the budget:
// then a freed buffer goes to the first waiter if it has the size asked
// for (of this area or another), and is dropped otherwise, its bytes
// returned to the budget.
type diffBufferPool struct {
	size   int           // bytes per buffer; immutable
	keep   int           // maximum free buffers kept; immutable
	budget *BufferBudget // bounds the bytes of live buffers; immutable
	kick   func()        // starts the area's store worker if it has work; immutable

	mu   sync.Mutex
	free []*DiffBuffer // free buffers, each holding budget; guarded by mu
	live int           // buffers allocated and not dropped; guarded by mu
	peak int           // highest live seen; guarded by mu
}

// newDiffBufferPool returns a pool of size-byte buffers drawing on budget,
// which it joins until close.
func newDiffBufferPool(size, keep int, budget *BufferBudget, kick func()) *diffBufferPool {
	p := &diffBufferPool{size: size, keep: keep, budget: budget, kick: kick}
	budget.join(p)
	return p
}

// limit returns how many buffers the area may hold at most, alone on its
// budget (at least one).
func (p *diffBufferPool) limit() int {
	return int(max(p.budget.Limit()/int64(p.size), 1))
}

// tryTake returns a buffer without waiting, or nil when none is free and
// the budget is spent (or others wait for it).
func (p *diffBufferPool) tryTake() *DiffBuffer {
	p.mu.Lock()
	if n := len(p.free); n > 0 {
		b := p.free[n-1]
		p.free[n-1] = nil
		p.free = p.free[:n-1]
		p.mu.Unlock()
		return b
	}
	if !p.budget.tryAcquire(int64(p.size)) {
		p.mu.Unlock()
		return nil
	}
	p.countNewLocked()
	p.mu.Unlock()
	return &DiffBuffer{data: make([]byte, p.size)}
}

// take returns a buffer, waiting for the budget when it is spent; the
// waiter makes every area of the budget drop its free buffers and store
// its queued chunks. It fails with ctx.Err() or errClosing.
func (p *diffBufferPool) take(ctx context.Context, stop <-chan struct{}) (*DiffBuffer, error) {
	if b := p.tryTake(); b != nil {
		return b, nil
	}
	b, err := p.budget.acquire(ctx, stop, int64(p.size))
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.countNewLocked()
	p.mu.Unlock()
	if b == nil {
		b = &DiffBuffer{data: make([]byte, p.size)}
	}
	return b, nil
}

// countNewLocked counts a buffer about to be allocated or handed over, its
// budget granted. p.mu must be held.
func (p *diffBufferPool) countNewLocked() {
	p.live++
	p.peak = max(p.peak, p.live)
}

// release returns a buffer: it is kept while the free list is short and
// nobody waits for the budget, and otherwise handed to the first waiter
// or dropped.
func (p *diffBufferPool) release(b *DiffBuffer) {
	p.mu.Lock()
	if len(p.free) < p.keep && !p.budget.starving() {
		p.free = append(p.free, b)
		p.mu.Unlock()
		return
	}
	p.live--
	p.mu.Unlock()
	if !p.budget.handOff(b) {
		p.budget.Release(int64(p.size))
	}
}

// starving reports whether someone waits for the budget, in this area or
// another.
func (p *diffBufferPool) starving() bool { return p.budget.starving() }

// starved is called by the budget when someone starts waiting for it: the
// free buffers are dropped and the store worker kicked, so that bytes come
// back.
func (p *diffBufferPool) starved() {
	p.dropFree()
	p.kick()
}

// stats returns the live and peak buffer counts.
func (p *diffBufferPool) stats() (live, peak int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.live, p.peak
}

// dropFree drops the free buffers, returning their bytes to the budget.
func (p *diffBufferPool) dropFree() {
	p.mu.Lock()
	n := len(p.free)
	p.live -= n
	clear(p.free)
	p.free = p.free[:0]
	p.mu.Unlock()
	if n > 0 {
		p.budget.Release(int64(n) * int64(p.size))
	}
}

// close drops the free buffers and leaves the budget; the buffers still in
// use must have been released.
func (p *diffBufferPool) close() {
	p.budget.leave(p)
	p.dropFree()
}
