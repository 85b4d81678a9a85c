// Package testwait lets a test wait for an event it cannot be told of
// (a server dropping a connection, a worker going idle) instead of
// sleeping for a time that a slower machine would not honour: it polls a
// condition until it holds, and fails the test only after a bound far
// above any wait that a correct program needs.
package testwait

import (
	"testing"
	"time"
)

// Bound is how long For waits before it fails the test.
const Bound = 30 * time.Second

// For polls cond every millisecond until it holds, failing t with what
// was awaited if it still does not after Bound.
func For(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(Bound); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", Bound, what)
		}
	}
}
