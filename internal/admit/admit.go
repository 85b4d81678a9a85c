// Package admit counts the requests inside something that must, at times,
// turn new ones away and wait until those inside have left: a filtered
// device paused for a snapshot take, a difference area closing.
//
// While it is open, admitting a request and letting it out are one atomic
// operation each on a word that holds the count and a closed bit: nothing
// is shared between the goroutines that admit requests but that cache
// line. A mutex serves only the slow paths: a request waiting for the
// door to reopen, and a wait for the count to drain.
package admit

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/ublksnap/ublksnap/internal/broadcast"
)

// closedBit is the bit of Door.state set while the door is closed.
const closedBit = int64(1) << 62

// Door admits requests while open. The zero value is open.
type Door struct {
	// state is the count of requests admitted and not yet left, with
	// closedBit set while the door is closed. A request is admitted only
	// by a compare-and-swap that sees the bit clear.
	state atomic.Int64

	mu       sync.Mutex
	reopened broadcast.Signal // wakes Enter when the door reopens; guarded by mu
	drained  broadcast.Signal // wakes Drain when the count reaches 0 while closed; guarded by mu
}

// TryEnter admits a request unless the door is closed. It never blocks.
func (d *Door) TryEnter() bool {
	for {
		s := d.state.Load()
		if s&closedBit != 0 {
			return false
		}
		if d.state.CompareAndSwap(s, s+1) {
			return true
		}
	}
}

// Enter admits a request, waiting while the door is closed, until ctx
// ends (ctx.Err()).
func (d *Door) Enter(ctx context.Context) error {
	if d.TryEnter() {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// Reopen clears the bit under mu, so it cannot come between a failed
	// TryEnter here and the wait.
	for !d.TryEnter() {
		reopened := d.reopened.Wait()
		d.mu.Unlock()
		select {
		case <-reopened:
		case <-ctx.Done():
			d.mu.Lock()
			return ctx.Err()
		}
		d.mu.Lock()
	}
	return nil
}

// Leave ends an admitted request.
func (d *Door) Leave() {
	if d.state.Add(-1) == closedBit {
		// The last request a Drain waits for: Drain looks at the count
		// under mu, so this broadcast cannot be missed.
		d.mu.Lock()
		d.drained.Broadcast()
		d.mu.Unlock()
	}
}

// Inside returns the number of requests admitted and not yet left.
func (d *Door) Inside() int64 { return d.state.Load() &^ closedBit }

// Close turns new requests away and reports whether the door was open.
func (d *Door) Close() bool { return d.state.Or(closedBit)&closedBit == 0 }

// Drain waits until the door is closed with no admitted request inside
// (reopened meanwhile, it waits for the next close), or ctx ends
// (ctx.Err()); a closed empty door drains whatever the state of ctx.
func (d *Door) Drain(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.state.Load() != closedBit {
		drained := d.drained.Wait()
		d.mu.Unlock()
		select {
		case <-drained:
		case <-ctx.Done():
			d.mu.Lock()
			if d.state.Load() == closedBit {
				return nil
			}
			return ctx.Err()
		}
		d.mu.Lock()
	}
	return nil
}

// Reopen admits requests again and wakes those waiting in Enter.
func (d *Door) Reopen() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.state.And(^closedBit)
	d.reopened.Broadcast()
}
