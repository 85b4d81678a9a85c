package admit

import (
	"context"
	"errors"
	"testing"
)

// A closed door turns requests away, drains once the last one leaves (an
// empty one even with its context ended), closes once, and admits again
// after Reopen, waking a request waiting in Enter.
func TestDoor(t *testing.T) {
	var d Door
	if first, second := d.TryEnter(), d.TryEnter(); !first || !second || d.Inside() != 2 {
		t.Fatalf("an open door admitted %d of 2", d.Inside())
	}
	if !d.Close() || d.Close() {
		t.Fatal("Close did not report the first close alone")
	}
	if d.TryEnter() {
		t.Fatal("a closed door admitted a request")
	}
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	if err := d.Drain(ended); !errors.Is(err, context.Canceled) {
		t.Fatalf("Drain with requests inside and its context ended: %v", err)
	}
	drained := make(chan error)
	go func() { drained <- d.Drain(context.Background()) }()
	d.Leave()
	d.Leave()
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if err := d.Drain(ended); err != nil {
		t.Fatalf("Drain of an empty door: %v", err)
	}
	entered := make(chan error)
	go func() { entered <- d.Enter(context.Background()) }()
	d.Reopen()
	if err := <-entered; err != nil || d.Inside() != 1 {
		t.Fatalf("Enter after Reopen: %v, %d inside", err, d.Inside())
	}
	d.Close()
	if err := d.Enter(ended); !errors.Is(err, context.Canceled) {
		t.Fatalf("Enter of a closed door with its context ended: %v", err)
	}
}
