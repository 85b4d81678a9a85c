//go:build vmtest

// Package vm tests the VM harness itself from the host: test/vm/run must
// boot a ublk kernel and turn the guest command's exit status into its own.
package vm

import (
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func runVM(t *testing.T, args ...string) (int, time.Duration) {
	t.Helper()
	return runVMWith(t, nil, args...)
}

// runVMWith runs test/vm/run with options opts before the command.
func runVMWith(t *testing.T, opts []string, args ...string) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	cmd := exec.Command("./run", append(append(append([]string{"--timeout", "300"}, opts...), "--"), args...)...)
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
		// A boot takes 5-15 s; the first run also unpacks the kernel, and
		// a boot that dies early is retried: 2 minutes means something hangs.
		if took > 120*time.Second {
			t.Errorf("test/vm/run -- %q took %v, want under 2 minutes", tc.args, took)
		}
		t.Logf("test/vm/run -- %q: exit %d in %v", tc.args, got, took.Round(100*time.Millisecond))
	}
}

func TestRunRejectsMissingCommand(t *testing.T) {
	if got, _ := runVM(t); got != 2 {
		t.Fatalf("test/vm/run with no command exited %d, want 2 (usage error)", got)
	}
}

// TestRunKernelLines boots each kernel line and checks that the guest runs
// the very kernel --print-kernel names, and that bad --kernel values are
// usage errors.
func TestRunKernelLines(t *testing.T) {
	for line, prefix := range map[string]string{"6.12": "6.12.", "7": "7."} {
		out, err := exec.Command("./run", "--kernel", line, "--print-kernel").Output()
		kver := strings.TrimSpace(string(out))
		if err != nil || !strings.HasPrefix(kver, prefix) {
			t.Errorf("test/vm/run --kernel %s --print-kernel: %q, %v; want a %s* version", line, kver, err, prefix)
			continue
		}
		check := `test "$(uname -r)" = "$1" && test -e /dev/ublk-control`
		if got, took := runVMWith(t, []string{"--kernel", line}, "sh", "-c", check, "sh", kver); got != 0 {
			t.Errorf("test/vm/run --kernel %s: exit %d, want 0 (kernel %s with ublk)", line, got, kver)
		} else {
			t.Logf("--kernel %s booted %s and ran in %v", line, kver, took.Round(100*time.Millisecond))
		}
	}
	for _, args := range [][]string{
		{"--kernel", "5.10", "--", "true"},
		{"--kernel", "5.10", "--print-kernel"},
		{"--kernel"},
	} {
		err := exec.Command("./run", args...).Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Errorf("test/vm/run %q: %v, want exit 2 (usage error)", args, err)
		}
	}
}
