package storage

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/ublksnap/ublksnap/internal/broadcast"
)

// EventCode is the kind of an Event. blksnap numbered its codes differently
// in each revision, so these numbers are ublksnap's own.
type EventCode int

// Event codes.
const (
	// EventLowFreeSpace asks for RequestedSectors more sectors of storage.
	EventLowFreeSpace EventCode = iota + 1
	// EventCorrupted reports that Device's difference area failed with
	// Errno; its snapshot image is unusable.
	EventCorrupted
	// EventNoSpace reports that a growable storage file reached its limit;
	// RequestedSectors is the limit.
	EventNoSpace
)

func (c EventCode) String() string {
	switch c {
	case EventLowFreeSpace:
		return "low_free_space"
	case EventCorrupted:
		return "corrupted"
	case EventNoSpace:
		return "no_space"
	}
	return fmt.Sprintf("event(%#x)", int(c))
}

// Event is one notification of a snapshot.
type Event struct {
	Time time.Time // when the event was posted
	Code EventCode // what happened
	// RequestedSectors is the number of sectors asked for
	// (EventLowFreeSpace) or the limit reached (EventNoSpace).
	RequestedSectors int64
	// Device names the original device (EventCorrupted).
	Device string
	// Errno is the error that corrupted the device (EventCorrupted).
	Errno syscall.Errno
}

// ErrTimeout is returned by EventQueue.Wait when no event arrived in time.
var ErrTimeout = errors.New("storage: no event before the timeout")

// ErrEventQueueClosed is returned by EventQueue.Wait once the queue is
// closed: its snapshot was destroyed.
var ErrEventQueueClosed = errors.New("storage: snapshot destroyed")

// EventQueue is the event queue of one snapshot. Post appends, Wait takes the
// oldest event; each event goes to exactly one waiter. It is safe for
// concurrent use.
type EventQueue struct {
	mu     sync.Mutex
	events []Event          // posted and not yet taken; guarded by mu
	posted broadcast.Signal // wakes the waiters on Post and Close; guarded by mu
	closed bool             // set by Close; guarded by mu
}

// NewEventQueue returns an empty queue.
func NewEventQueue() *EventQueue {
	return &EventQueue{}
}

// Post appends an event (stamping Time if it is zero) and wakes the waiters.
func (q *EventQueue) Post(e Event) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.events = append(q.events, e)
	q.posted.Broadcast()
	q.mu.Unlock()
}

// Wait returns the oldest event, waiting up to timeout for one to be
// posted (0 does not wait). It returns ErrTimeout when none came, and
// ctx.Err() when ctx ends first.
func (q *EventQueue) Wait(ctx context.Context, timeout time.Duration) (Event, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		q.mu.Lock()
		if len(q.events) > 0 {
			e := q.events[0]
			q.events[0] = Event{}
			q.events = q.events[1:]
			q.mu.Unlock()
			return e, nil
		}
		if q.closed {
			q.mu.Unlock()
			return Event{}, ErrEventQueueClosed
		}
		posted := q.posted.Wait()
		q.mu.Unlock()
		select {
		case <-posted:
		case <-timer.C:
			return Event{}, ErrTimeout
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Close drops the waiting events and wakes every waiter, which gets
// ErrEventQueueClosed, as do later calls of Wait. Later posts are dropped.
func (q *EventQueue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	q.closed = true
	q.events = nil
	q.posted.Broadcast()
}

// Len returns the number of events waiting to be taken.
func (q *EventQueue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.events)
}
