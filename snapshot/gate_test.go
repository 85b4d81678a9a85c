package snapshot

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestGatePauseDrainsAndBlocks(t *testing.T) { synctest.Test(t, testGatePauseDrainsAndBlocks) }

func testGatePauseDrainsAndBlocks(t *testing.T) {
	g := newGate()
	if first, second := g.TryEnter(), g.TryEnter(); !first || !second {
		t.Fatal("an open gate refused TryEnter")
	}
	paused := make(chan error)
	go func() { paused <- g.Pause(context.Background()) }()
	synctest.Wait() // Pause waits, or has returned
	select {
	case <-paused:
		t.Fatal("Pause returned with two requests in flight")
	default:
	}
	// While pausing, nothing new gets in, and TryEnter does not block.
	if g.TryEnter() {
		t.Fatal("TryEnter admitted a request into a pausing gate")
	}
	g.Leave()
	g.Leave()
	if err := <-paused; err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{})
	go func() {
		g.Enter(context.Background())
		close(entered)
	}()
	synctest.Wait() // Enter waits, or has returned
	select {
	case <-entered:
		t.Fatal("Enter got through a paused gate")
	default:
	}
	g.Resume()
	<-entered
	g.Leave()
}

func TestGatePauseCancelled(t *testing.T) {
	g := newGate()
	g.TryEnter()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := g.Pause(ctx); err == nil {
		t.Fatal("Pause with a request that never leaves returned nil")
	}
	if !g.TryEnter() {
		t.Fatal("a cancelled Pause left the gate closed")
	}
}

// TestGateNoRequestInFlightWhilePaused hammers the gate from many goroutines
// and checks the invariant a take relies on.
func TestGateNoRequestInFlightWhilePaused(t *testing.T) {
	g := newGate()
	var inside atomic.Int64
	var pausedFlag atomic.Bool
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if i%2 == 0 {
					if !g.TryEnter() {
						continue
					}
				} else if err := g.Enter(context.Background()); err != nil {
					t.Error(err)
					return
				}
				inside.Add(1)
				if pausedFlag.Load() {
					t.Error("a request is inside a paused gate")
				}
				inside.Add(-1)
				g.Leave()
			}
		}(i)
	}
	for i := 0; i < 200; i++ {
		if err := g.Pause(context.Background()); err != nil {
			t.Fatal(err)
		}
		pausedFlag.Store(true)
		if n := inside.Load(); n != 0 {
			t.Fatalf("%d requests inside after Pause returned", n)
		}
		pausedFlag.Store(false)
		g.Resume()
	}
	close(stop)
	wg.Wait()
}

// Many goroutines enter and leave while pauses come and go: no request is
// ever inside while a Pause has returned, and every pause ends.
func TestGateConcurrentPauses(t *testing.T) {
	g := newGate()
	var inside, paused atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if (i+w)%3 == 0 {
					if err := g.Enter(context.Background()); err != nil {
						t.Error(err)
						return
					}
				} else if !g.TryEnter() {
					continue
				}
				inside.Add(1)
				if paused.Load() != 0 {
					t.Error("a request is inside while the gate is paused")
				}
				inside.Add(-1)
				g.Leave()
			}
		})
	}
	for range 2000 {
		if err := g.Pause(context.Background()); err != nil {
			t.Fatal(err)
		}
		paused.Store(1)
		if n := inside.Load(); n != 0 || g.inFlight() != 0 {
			t.Fatalf("%d requests inside (%d admitted) after Pause returned", n, g.inFlight())
		}
		paused.Store(0)
		g.Resume()
	}
	close(stop)
	wg.Wait()
}
