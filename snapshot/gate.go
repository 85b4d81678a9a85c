package snapshot

import (
	"context"
	"sync"

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
// completes it.
type gate struct {
	mu       sync.Mutex
	inflight int              // requests admitted and not yet left; guarded by mu
	paused   bool             // Pause has closed the gate; guarded by mu
	resumed  broadcast.Signal // wakes Enter when the gate reopens; guarded by mu
	drained  broadcast.Signal // wakes Pause when inflight reaches 0; guarded by mu
}

func newGate() *gate { return &gate{} }

// TryEnter admits a request unless the gate is paused. It never blocks.
func (g *gate) TryEnter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.paused {
		return false
	}
	g.inflight++
	return true
}

// Enter admits a request, waiting while the gate is paused.
func (g *gate) Enter(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.paused {
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
	g.inflight++
	return nil
}

// Leave ends an admitted request.
func (g *gate) Leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inflight--
	if g.inflight == 0 {
		g.drained.Broadcast()
	}
}

// Pause closes the gate and waits until no admitted request is left. If ctx
// ends first the gate is reopened and ctx's error returned.
func (g *gate) Pause(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.paused = true
	for g.inflight > 0 {
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
	g.paused = false
	g.resumed.Broadcast()
}
