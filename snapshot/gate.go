package snapshot

import (
	"context"

	"github.com/ublksnap/ublksnap/internal/admit"
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
// completes it; while the gate is open each is one atomic operation, and
// no lock is shared between the device's queues (admit.Door).
type gate struct {
	admit.Door
}

func newGate() *gate { return &gate{} }

// inFlight returns the number of requests admitted and not yet left.
func (g *gate) inFlight() int64 { return g.Inside() }

// Pause closes the gate and waits until no admitted request is left. If ctx
// ends first the gate is reopened and ctx's error returned.
func (g *gate) Pause(ctx context.Context) error {
	g.Close()
	if err := g.Drain(ctx); err != nil {
		g.Reopen()
		return err
	}
	return nil
}

// Resume reopens a paused gate and wakes the requests waiting in Enter.
func (g *gate) Resume() { g.Reopen() }
