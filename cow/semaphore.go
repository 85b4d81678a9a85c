package cow

import (
	"context"
	"errors"
	"sync"
)

// errClosing is what a wait for a chunk or a buffer ends with when the
// difference area closes.
var errClosing = errors.New("cow: difference area closing")

// semaphore is a binary semaphore, the Go counterpart of the kernel's
// struct semaphore initialised to 1. Unlike a mutex it has no owner: one
// goroutine may take it and another release it, which is how a chunk stays
// locked from the writer that starts its load to the worker that stores
// it; and a wait for it can be given up. It lives inside its Chunk and allocates nothing unless someone
// has to wait: then a channel for that waiter, closed when the semaphore is
// handed to it.
type semaphore struct {
	mu      sync.Mutex
	held    bool            // guarded by mu
	waiters []chan struct{} // in order of arrival; guarded by mu
}

// tryAcquire takes the semaphore if it is free.
func (s *semaphore) tryAcquire() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held {
		return false
	}
	s.held = true
	return true
}

// acquire takes the semaphore, waiting in turn while it is held. It fails
// with ctx.Err() when ctx ends first and with errClosing when stop is
// closed first, holding nothing.
func (s *semaphore) acquire(ctx context.Context, stop <-chan struct{}) error {
	s.mu.Lock()
	if !s.held {
		s.held = true
		s.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	s.waiters = append(s.waiters, ch)
	s.mu.Unlock()
	var err error
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-stop:
		err = errClosing
	}
	s.mu.Lock()
	for i, w := range s.waiters {
		if w == ch {
			s.waiters = append(s.waiters[:i], s.waiters[i+1:]...)
			s.mu.Unlock()
			return err
		}
	}
	// Handed to us as we gave up: pass it on.
	s.mu.Unlock()
	s.release()
	return err
}

// release frees the semaphore, or hands it to the first waiter. Releasing
// a free semaphore is a bug.
func (s *semaphore) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.held {
		panic("cow: invariant violated: release of a semaphore that is not held")
	}
	if len(s.waiters) == 0 {
		s.held = false
		return
	}
	ch := s.waiters[0]
	s.waiters[0] = nil
	s.waiters = s.waiters[1:]
	close(ch) // held stays set: the waiter has it now
}
