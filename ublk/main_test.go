package ublk

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when they leave goroutines behind,
// as error paths that forget a worker would.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
