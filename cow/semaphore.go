package cow

import (
	"context"
	"errors"
)

// errClosing is returned by waits that end because the DiffArea is being
// closed.
var errClosing = errors.New("cow: difference area closing")

// semaphore is a binary semaphore, the Go counterpart of the kernel's
// struct semaphore initialised to 1. Unlike sync.Mutex it has no owner: one
// goroutine may acquire it and another release it, which is how a chunk
// stays locked from the writer that starts its load to the worker that
// stores it. A token in the channel means "held".
type semaphore chan struct{}

func newSemaphore() semaphore { return make(semaphore, 1) }

// tryAcquire takes the semaphore if it is free and reports whether it did.
func (s semaphore) tryAcquire() bool {
	select {
	case s <- struct{}{}:
		return true
	default:
		return false
	}
}

// acquire waits for the semaphore until ctx ends (ctx.Err()) or stop is
// closed (errClosing).
func (s semaphore) acquire(ctx context.Context, stop <-chan struct{}) error {
	select {
	case s <- struct{}{}:
		return nil
	default:
	}
	select {
	case s <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-stop:
		return errClosing
	}
}

// release frees the semaphore. Releasing a free semaphore is a bug.
func (s semaphore) release() {
	select {
	case <-s:
	default:
		panic("cow: invariant violated: release of a semaphore that is not held")
	}
}
