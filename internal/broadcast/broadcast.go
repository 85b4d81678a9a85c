// Package broadcast wakes every goroutine waiting for a condition at once:
// the close-a-channel-and-make-a-new-one idiom, written once.
package broadcast

// Signal wakes all goroutines waiting on it at the moment Broadcast is
// called. The zero value is ready, and a Signal nobody waits on allocates
// nothing.
//
// A Signal has no lock of its own: its owner calls Wait and Broadcast
// under the mutex that guards the condition the waiters look at. A waiter
// then checks the condition and takes Wait's channel under one hold of
// that mutex, and so cannot miss a Broadcast:
//
//	mu.Lock()
//	for !cond {
//		ch := sig.Wait()
//		mu.Unlock()
//		<-ch // or a select with a context
//		mu.Lock()
//	}
type Signal struct {
	ch chan struct{} // closed by Broadcast; nil while nobody waits
}

// Wait returns a channel that is closed by the next Broadcast.
func (s *Signal) Wait() <-chan struct{} {
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

// Broadcast wakes every goroutine waiting on a channel from Wait.
func (s *Signal) Broadcast() {
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
}
