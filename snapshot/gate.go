package snapshot

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/ublksnap/ublksnap/internal/broadcast"
)

// gate admits a filtered device's requests and lets a snapshot take pause
// them: Pause stops new requests and waits until every admitted one has
// left; Resume lets them in again. Taking a snapshot pauses the gates of all
// member devices before switching any of them to COW, so every member
// switches at one instant with no write in flight anywhere.
//
// A request enters on the ublk queue goroutine with TryEnter, which never
// blocks (a paused gate answers false and the request is retried on a
// worker with Enter), and leaves with Leave from whichever goroutine
// completes it. Both are one atomic operation on state while the gate is
// open: no lock is shared between the queues of a device. The mutex is
// for the slow paths only, a pause and the requests waiting out one.
type gate struct {
	// state is the count of requests admitted and not yet left, with
	// gatePaused set while Pause has closed the gate. A request is
	// admitted only by a compare-and-swap that sees the bit clear.
	state atomic.Int64

	mu      sync.Mutex
	resumed broadcast.Signal // wakes Enter when the gate reopens; guarded by mu
	drained broadcast.Signal // wakes Pause when the count reaches 0 while paused; guarded by mu
}

// gatePaused is the bit of gate.state set while the gate is paused.
const gatePaused = int64(1) << 62

func newGate() *gate { return &gate{} }

// TryEnter admits a request unless the gate is paused. It never blocks.
func (g *gate) TryEnter() bool {
	for {
		s := g.state.Load()
		if s&gatePaused != 0 {
			return false
		}
		if g.state.CompareAndSwap(s, s+1) {
			return true
		}
	}
}

// Enter admits a request, waiting while the gate is paused.
func (g *gate) Enter(ctx context.Context) error {
	if g.TryEnter() {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	// Resume clears the bit under mu, so it cannot come between a
	// failed TryEnter here and the wait.
	for !g.TryEnter() {
		resumed := g.resumed.Wait()
		g.mu.Unlock()
		select {
		case <-resumed:
		case <-ctx.Done():
			g.mu.Lock()
			return ctx.Err()
		}
		g.mu.Lock()
	}
	return nil
}

// inFlight returns the number of requests admitted and not yet left.
func (g *gate) inFlight() int64 { return g.state.Load() &^ gatePaused }

// Leave ends an admitted request.
func (g *gate) Leave() {
	if g.state.Add(-1) == gatePaused {
		// The last request a pause waits for: Pause looks at the
		// count under mu, so this broadcast cannot be missed.
		g.mu.Lock()
		g.drained.Broadcast()
		g.mu.Unlock()
	}
}

// Pause closes the gate and waits until no admitted request is left. If ctx
// ends first the gate is reopened and ctx's error returned.
func (g *gate) Pause(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.state.Or(gatePaused)
	for g.state.Load() != gatePaused {
		drained := g.drained.Wait()
		g.mu.Unlock()
		select {
		case <-drained:
		case <-ctx.Done():
			g.mu.Lock()
			g.resumeLocked()
			return ctx.Err()
		}
		g.mu.Lock()
	}
	return nil
}

// Resume reopens a paused gate and wakes the requests waiting in Enter.
func (g *gate) Resume() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.resumeLocked()
}

func (g *gate) resumeLocked() {
	g.state.And(^gatePaused)
	g.resumed.Broadcast()
}
