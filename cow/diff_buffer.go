package cow

import (
	"context"
	"sync"

	"github.com/ublksnap/ublksnap/internal/broadcast"
)

// DiffBuffer holds one chunk's data in memory (blksnap's struct
// diff_buffer). Its length is the full chunk size; a short last chunk uses
// a prefix.
type DiffBuffer struct {
	data []byte
}

// diffBufferPool hands out DiffBuffers for one difference area. It bounds
// the number of live buffers (in use plus free) to limit: take waits when
// all of them are in use. Free buffers beyond keep are dropped, as blksnap
// drops buffers beyond free_diff_buffer_pool_size.
type diffBufferPool struct {
	size  int // bytes per buffer; immutable
	limit int // maximum live buffers; immutable
	keep  int // maximum free buffers kept; immutable

	mu       sync.Mutex
	free     []*DiffBuffer    // free buffers; guarded by mu
	live     int              // buffers allocated and not dropped; guarded by mu
	peak     int              // highest live seen; guarded by mu
	waiters  int              // goroutines in take waiting; guarded by mu
	released broadcast.Signal // wakes the waiters when a buffer comes back; guarded by mu
}

func newDiffBufferPool(size, limit, keep int) *diffBufferPool {
	return &diffBufferPool{size: size, limit: max(limit, 1), keep: keep}
}

// tryTake returns a buffer without waiting, or nil when the limit is
// reached.
func (p *diffBufferPool) tryTake() *DiffBuffer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tryTakeLocked()
}

// tryTakeLocked is tryTake; p.mu must be held.
func (p *diffBufferPool) tryTakeLocked() *DiffBuffer {
	if n := len(p.free); n > 0 {
		b := p.free[n-1]
		p.free[n-1] = nil
		p.free = p.free[:n-1]
		return b
	}
	if p.live >= p.limit {
		return nil
	}
	p.live++
	p.peak = max(p.peak, p.live)
	// Allocating under mu keeps the accounting exact; it is rare (the
	// pool keeps buffers) and short next to the I/O that follows.
	return &DiffBuffer{data: make([]byte, p.size)}
}

// take returns a buffer, waiting for one to be released when the limit is
// reached. starved is called (without p.mu) once the caller is counted as a
// waiter, so that the store worker frees buffers. It fails with ctx.Err()
// or errClosing.
func (p *diffBufferPool) take(ctx context.Context, stop <-chan struct{}, starved func()) (*DiffBuffer, error) {
	p.mu.Lock()
	if b := p.tryTakeLocked(); b != nil {
		p.mu.Unlock()
		return b, nil
	}
	p.waiters++
	defer func() {
		p.mu.Lock()
		p.waiters--
		p.mu.Unlock()
	}()
	for {
		released := p.released.Wait()
		p.mu.Unlock()
		starved()
		select {
		case <-released:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-stop:
			return nil, errClosing
		}
		p.mu.Lock()
		if b := p.tryTakeLocked(); b != nil {
			p.mu.Unlock()
			return b, nil
		}
	}
}

// release returns a buffer. It is kept when someone waits or the free list
// is short, and dropped otherwise.
func (p *diffBufferPool) release(b *DiffBuffer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.waiters > 0 || len(p.free) < p.keep {
		p.free = append(p.free, b)
	} else {
		p.live--
	}
	p.released.Broadcast()
}

// starving reports whether a taker waits for a buffer.
func (p *diffBufferPool) starving() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waiters > 0
}

// stats returns the live and peak buffer counts.
func (p *diffBufferPool) stats() (live, peak int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.live, p.peak
}

// cleanup drops the free buffers.
func (p *diffBufferPool) cleanup() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.live -= len(p.free)
	clear(p.free)
	p.free = nil
}
