// Package caller carries the process a daemon request comes from in its
// context.Context, and resolves the paths the request names in that
// process's view of the filesystem.
//
// The daemon lives in a private mount namespace that does not see
// filesystems mounted after it started; through the caller's root
// (/proc/PID/root) it opens what the caller sees, and the caller's mount
// table (/proc/PID/mountinfo) is the first one searched for a device's
// filesystems. A context with no caller is this process itself: the zero
// Caller, whose root is "" (paths are opened as given).
package caller

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
)

// key is the context key of the Caller.
type key struct{}

// Caller is the process a request comes from.
type Caller struct {
	Root      string // its root directory as this process opens it, e.g. /proc/PID/root; "" for this process
	MountInfo string // its mount table, e.g. /proc/PID/mountinfo; "" for none
}

// FromPID is the Caller of process pid, seen through /proc.
func FromPID(pid int) Caller {
	return Caller{Root: fmt.Sprintf("/proc/%d/root", pid), MountInfo: fmt.Sprintf("/proc/%d/mountinfo", pid)}
}

// With returns a context whose requests come from c.
func With(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, key{}, c)
}

// Of returns the Caller of ctx; the zero Caller is this process.
func Of(ctx context.Context) Caller {
	c, _ := ctx.Value(key{}).(Caller)
	return c
}

// Path returns the absolute path p of the caller of ctx, cleaned, as this
// process opens it. A relative p is an error (EINVAL): the daemon has no
// working directory of the caller's.
func Path(ctx context.Context, p string) (string, error) {
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("%q is not an absolute path: %w", p, syscall.EINVAL)
	}
	return Of(ctx).Root + filepath.Clean(p), nil
}
