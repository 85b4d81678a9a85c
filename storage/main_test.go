package storage

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when they leave goroutines behind,
// such as a grower that outlives its storage or a forgotten waiter.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
