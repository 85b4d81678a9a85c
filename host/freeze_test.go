package host

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The daemon's side of the freeze holder protocol, against stand-in
// holders: the thaw ends the holder through its standard input.
func TestFreezeHolderProtocol(t *testing.T) {
	log := filepath.Join(t.TempDir(), "log")
	holder := System{FreezeHolder: []string{"sh", "-c", `echo "$@" >"$0"; echo frozen; cat >/dev/null; echo thawed >>"$0"`, log}}
	thaw, err := holder.holdFreeze([]mount{{path: "/mnt/a", open: "/proc/1/root/mnt/a"}})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(log); string(got) != "/proc/1/root/mnt/a\n" {
		t.Fatalf("holder got %q, want the mount point to open", got)
	}
	if err := thaw(); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(log); !strings.HasSuffix(string(got), "thawed\n") {
		t.Fatalf("the holder did not see the thaw: %q", got)
	}

	failing := System{FreezeHolder: []string{"sh", "-c", "echo cannot freeze >&2; exit 1"}}
	if _, err := failing.holdFreeze([]mount{{path: "/mnt/a", open: "/mnt/a"}}); err == nil || !strings.Contains(err.Error(), "cannot freeze") {
		t.Fatalf("a failing holder: %v, want its message", err)
	}
}

// A holder that cannot freeze says so and exits without the mark.
func TestRunFreezeHolderFails(t *testing.T) {
	var out bytes.Buffer
	err := RunFreezeHolder([]string{filepath.Join(t.TempDir(), "missing")}, strings.NewReader(""), &out)
	if err == nil || out.Len() != 0 {
		t.Fatalf("freeze of a missing path: %v, output %q", err, out.String())
	}
}
