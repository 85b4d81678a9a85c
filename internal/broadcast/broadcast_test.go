package broadcast

import (
	"sync"
	"testing"
	"time"
)

// Every waiter of a round wakes on its Broadcast, and no waiter misses a
// change of the condition made under the owner's lock.
func TestSignalWakesAllWaiters(t *testing.T) {
	var (
		mu    sync.Mutex
		sig   Signal
		round int // guarded by mu
	)
	const waiters, rounds = 16, 50
	var wg sync.WaitGroup
	for range waiters {
		wg.Go(func() {
			mu.Lock()
			defer mu.Unlock()
			for seen := 0; seen < rounds; {
				for round == seen {
					ch := sig.Wait()
					mu.Unlock()
					<-ch
					mu.Lock()
				}
				seen = round
			}
		})
	}
	for range rounds {
		time.Sleep(100 * time.Microsecond)
		mu.Lock()
		round++
		sig.Broadcast()
		mu.Unlock()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("waiters still sleep after the last broadcast")
	}
}

func TestZeroSignalBroadcastIsFree(t *testing.T) {
	var s Signal
	if n := testing.AllocsPerRun(100, s.Broadcast); n != 0 {
		t.Errorf("Broadcast with no waiter allocates %v times", n)
	}
	ch := s.Wait()
	if s.Wait() != ch {
		t.Error("two Waits before a Broadcast got different channels")
	}
	s.Broadcast()
	select {
	case <-ch:
	default:
		t.Error("Broadcast did not close the channel")
	}
}
