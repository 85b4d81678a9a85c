package caller

import (
	"context"
	"errors"
	"syscall"
	"testing"
)

func TestPath(t *testing.T) {
	bg := context.Background()
	if got, err := Path(bg, "/a/../b//c"); err != nil || got != "/b/c" {
		t.Fatalf("no caller: %q, %v; want /b/c as given, cleaned", got, err)
	}
	ctx := With(bg, FromPID(42))
	if got, err := Path(ctx, "/mnt/x"); err != nil || got != "/proc/42/root/mnt/x" {
		t.Fatalf("caller 42: %q, %v; want it through /proc/42/root", got, err)
	}
	if Of(ctx).MountInfo != "/proc/42/mountinfo" {
		t.Fatalf("caller 42's mount table: %q", Of(ctx).MountInfo)
	}
	if _, err := Path(ctx, "rel/x"); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("a relative path: %v, want EINVAL", err)
	}
}
