package snapshot

import (
	"context"
	"sync"
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
	inflight int           // requests admitted and not yet left; guarded by mu
	paused   bool          // Pause has closed the gate; guarded by mu
	resumed  chan struct{} // closed by Resume; replaced by Pause; guarded by mu
	drained  chan struct{} // closed when inflight reaches 0 while paused; guarded by mu
}

func newGate() *gate {
	g := &gate{resumed: make(chan struct{})}
	close(g.resumed)
	return g
}

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
	for {
		g.mu.Lock()
		if !g.paused {
			g.inflight++
			g.mu.Unlock()
			return nil
		}
		resumed := g.resumed
		g.mu.Unlock()
		select {
		case <-resumed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Leave ends an admitted request.
func (g *gate) Leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inflight--
	if g.inflight == 0 && g.drained != nil {
		close(g.drained)
		g.drained = nil
	}
}

// Pause closes the gate and waits until no admitted request is left. If ctx
// ends first the gate is reopened and ctx's error returned.
func (g *gate) Pause(ctx context.Context) error {
	g.mu.Lock()
	g.paused = true
	g.resumed = make(chan struct{})
	var drained chan struct{}
	if g.inflight > 0 {
		drained = make(chan struct{})
		g.drained = drained
	}
	g.mu.Unlock()
	if drained == nil {
		return nil
	}
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		g.Resume()
		return ctx.Err()
	}
}

// Resume reopens a paused gate and wakes the requests waiting in Enter.
func (g *gate) Resume() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.paused {
		return
	}
	g.paused = false
	g.drained = nil
	close(g.resumed)
}
