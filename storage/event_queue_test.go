package storage

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

// Close wakes every waiter with ErrEventQueueClosed, fails later waits at
// once and drops what is posted afterwards.
func TestEventQueueClose(t *testing.T) { synctest.Test(t, testEventQueueClose) }

func testEventQueueClose(t *testing.T) {
	q := NewEventQueue()
	q.Post(Event{Code: EventLowFreeSpace})
	if e, err := q.Wait(context.Background(), 0); err != nil || e.Code != EventLowFreeSpace {
		t.Fatalf("Wait = %+v, %v", e, err)
	}
	const waiters = 3
	woke := make(chan error, waiters)
	for range waiters {
		go func() {
			_, err := q.Wait(context.Background(), time.Hour)
			woke <- err
		}()
	}
	synctest.Wait() // every waiter sleeps
	q.Close()
	for range waiters {
		select {
		case err := <-woke:
			if !errors.Is(err, ErrEventQueueClosed) {
				t.Errorf("waiter woke with %v, want ErrEventQueueClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a waiter still sleeps after Close")
		}
	}
	q.Post(Event{Code: EventCorrupted})
	if n := q.Len(); n != 0 {
		t.Errorf("%d events kept after Close", n)
	}
	start := time.Now()
	if _, err := q.Wait(context.Background(), time.Hour); !errors.Is(err, ErrEventQueueClosed) {
		t.Errorf("Wait after Close: %v, want ErrEventQueueClosed", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Wait after Close took %v", d)
	}
	q.Close() // a second Close is harmless
}
