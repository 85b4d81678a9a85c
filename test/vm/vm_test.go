//go:build vmtest

// Package vm tests the VM harness itself from the host: test/vm/run must
// boot a ublk kernel and turn the guest command's exit status into its own.
package vm

import (
	"errors"
	"os/exec"
	"testing"
	"time"
)

func runVM(t *testing.T, args ...string) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	cmd := exec.Command("./run", append([]string{"--timeout", "300", "--"}, args...)...)
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, took
	case errors.As(err, &exit):
		t.Logf("%v: exit %d after %v\n%s", args, exit.ExitCode(), took, out)
		return exit.ExitCode(), took
	default:
		t.Fatalf("%v: %v\n%s", args, err, out)
		return -1, took
	}
}

func TestRunExitStatus(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"sh", "-c", "test -e /dev/ublk-control"}, 0},
		{[]string{"false"}, 1},
		{[]string{"sh", "-c", "exit 7"}, 7},
	} {
		got, took := runVM(t, tc.args...)
		if got != tc.want {
			t.Errorf("test/vm/run -- %q exited %d, want %d", tc.args, got, tc.want)
		}
		if took > 60*time.Second {
			t.Errorf("test/vm/run -- %q took %v, want under 60s", tc.args, took)
		}
		t.Logf("test/vm/run -- %q: exit %d in %v", tc.args, got, took.Round(100*time.Millisecond))
	}
}

func TestRunRejectsMissingCommand(t *testing.T) {
	if got, _ := runVM(t); got != 2 {
		t.Fatalf("test/vm/run with no command exited %d, want 2 (usage error)", got)
	}
}
