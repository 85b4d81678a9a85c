package cow

import (
	"context"
	"fmt"
	"slices"
	"sync"
)

// BufferBudget bounds the bytes of chunk buffers held by every difference
// area that shares it: the buffers in use and the free ones each area
// keeps for reuse. It is a weighted semaphore of bytes, served first come
// first served, that also tells the areas drawing on it when someone
// waits, so that they drop their free buffers and store their queued
// chunks (see the package documentation). A BufferBudget is safe for
// concurrent use.
//
// One request is always admitted when nothing is held, whatever its size,
// so a chunk larger than the whole budget still gets its buffer and
// nothing waits for ever.
type BufferBudget struct {
	limit int64 // bytes; immutable

	// mu guards every field below. The budget calls no one while holding
	// it; the pools call it under their own mutex (pool.mu before mu).
	mu      sync.Mutex
	used    int64                        // bytes granted and not released
	peak    int64                        // highest used so far
	queue   []*budgetWaiter              // blocked acquirers, oldest first
	members map[*diffBufferPool]struct{} // pools of the areas drawing on the budget
}

// budgetWaiter is one blocked acquirer.
type budgetWaiter struct {
	n     int64         // bytes asked for; immutable
	ready chan struct{} // closed, under BufferBudget.mu, once n bytes were granted
	buf   *DiffBuffer   // a buffer of n bytes handed over with the grant, or nil; set before ready is closed
}

// BudgetStats describes a BufferBudget, in bytes.
type BudgetStats struct {
	Limit   int64 // the bound
	Used    int64 // bytes held now (buffers in use, free ones kept, grants not yet allocated)
	Peak    int64 // highest Used so far, counted exactly where it changes
	Waiting int   // acquirers blocked now
}

// NewBufferBudget returns a budget of limit bytes (at least 1).
func NewBufferBudget(limit int64) *BufferBudget {
	return &BufferBudget{limit: max(limit, 1), members: make(map[*diffBufferPool]struct{})}
}

// Limit returns the bound in bytes.
func (b *BufferBudget) Limit() int64 { return b.limit }

// Stats returns the current counts.
func (b *BufferBudget) Stats() BudgetStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	return BudgetStats{Limit: b.limit, Used: b.used, Peak: b.peak, Waiting: len(b.queue)}
}

// Acquire takes n bytes of the budget. With nowait it answers
// ErrWouldBlock at once when they are not free (or others wait before
// it); otherwise it waits, in turn, until they are released or ctx ends
// (an error wrapping ctx.Err()). Every successful Acquire is paired with a
// Release of the same n.
func (b *BufferBudget) Acquire(ctx context.Context, n int64, nowait bool) error {
	if nowait {
		if !b.tryAcquire(n) {
			return ErrWouldBlock
		}
		return nil
	}
	if _, err := b.acquire(ctx, nil, n); err != nil {
		return fmt.Errorf("cow: wait for %d bytes of chunk buffer budget: %w", n, err)
	}
	return nil
}

// Release returns n bytes taken by Acquire and grants them to the waiters
// they now fit, in turn.
func (b *BufferBudget) Release(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
	if b.used < 0 {
		panic(fmt.Sprintf("cow: invariant violated: buffer budget released below zero (%d)", b.used))
	}
	b.grantWaitersLocked()
}

// tryAcquire takes n bytes if they fit and nobody waits before; it
// reports whether it did.
func (b *BufferBudget) tryAcquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.queue) > 0 || !b.fitsLocked(n) {
		return false
	}
	b.grantLocked(n)
	return true
}

// acquire takes n bytes, waiting in turn for them until ctx ends
// (ctx.Err()) or stop is closed (errClosing). Before it waits it tells
// every member pool that the budget is short (starved), after it joined
// the queue: a buffer freed from then on is released to the budget, or
// handed over with its bytes (handOff), instead of being kept. It returns
// the buffer handed over, if any.
func (b *BufferBudget) acquire(ctx context.Context, stop <-chan struct{}, n int64) (*DiffBuffer, error) {
	b.mu.Lock()
	if len(b.queue) == 0 && b.fitsLocked(n) {
		b.grantLocked(n)
		b.mu.Unlock()
		return nil, nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	b.queue = append(b.queue, w)
	members := make([]*diffBufferPool, 0, len(b.members))
	for p := range b.members {
		members = append(members, p)
	}
	b.mu.Unlock()
	for _, p := range members {
		p.starved()
	}
	var err error
	select {
	case <-w.ready:
		return w.buf, nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-stop:
		err = errClosing
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-w.ready:
		// Granted while giving up: hand the bytes on (and drop any buffer).
		b.used -= n
	default:
		b.queue = slices.DeleteFunc(b.queue, func(q *budgetWaiter) bool { return q == w })
	}
	b.grantWaitersLocked() // those behind w may fit now
	return nil, err
}

// handOff gives buf, with the bytes it holds, to the first waiter if that
// one asks for exactly its size, and reports whether it did. A freed
// buffer is so reused rather than dropped and allocated again while
// writers wait.
func (b *BufferBudget) handOff(buf *DiffBuffer) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.queue) == 0 || b.queue[0].n != int64(len(buf.data)) {
		return false
	}
	w := b.queue[0]
	b.queue[0] = nil
	b.queue = b.queue[1:]
	w.buf = buf
	close(w.ready)
	return true
}

// fitsLocked reports whether n more bytes may be granted: within the
// limit, or anything when nothing is held. b.mu must be held.
func (b *BufferBudget) fitsLocked(n int64) bool {
	return b.used == 0 || b.used+n <= b.limit
}

// grantLocked counts n bytes as held. b.mu must be held.
func (b *BufferBudget) grantLocked(n int64) {
	b.used += n
	b.peak = max(b.peak, b.used)
}

// grantWaitersLocked grants the waiters at the head of the queue as long
// as they fit. b.mu must be held.
func (b *BufferBudget) grantWaitersLocked() {
	for len(b.queue) > 0 && b.fitsLocked(b.queue[0].n) {
		w := b.queue[0]
		b.queue[0] = nil
		b.queue = b.queue[1:]
		b.grantLocked(w.n)
		close(w.ready)
	}
}

// starving reports whether someone waits for the budget.
func (b *BufferBudget) starving() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.queue) > 0
}

// join makes p a member: it is told when someone starts waiting.
func (b *BufferBudget) join(p *diffBufferPool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.members[p] = struct{}{}
}

// leave ends p's membership.
func (b *BufferBudget) leave(p *diffBufferPool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.members, p)
}
