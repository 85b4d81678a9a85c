package snapshot

import (
	"errors"
	"syscall"
)

// kind is a class of failure that callers act on. Each kind carries the
// errno it stands for, so that errors.As(err, &errno) finds an errno in
// every error of this package: the one of the system call that failed, or
// the kind's.
type kind struct {
	msg   string
	errno syscall.Errno
}

func (k *kind) Error() string { return k.msg }

// Is makes errors.Is(err, syscall.EXXX) hold for a kind carrying EXXX.
func (k *kind) Is(target error) bool {
	e, ok := target.(syscall.Errno)
	return ok && e == k.errno
}

// As lets errors.As(err, &errno) find the kind's errno.
func (k *kind) As(target any) bool {
	if p, ok := target.(*syscall.Errno); ok {
		*p = k.errno
		return true
	}
	return false
}

// Error kinds the manager wraps.
var (
	// ErrInvalid: the request cannot be done as given (EINVAL).
	ErrInvalid error = &kind{"invalid request", syscall.EINVAL}
	// ErrNotFound: no such device or snapshot (ENOENT).
	ErrNotFound error = &kind{"not found", syscall.ENOENT}
	// ErrConflict: the state forbids it: already taken, a member of
	// another snapshot, being destroyed (EALREADY).
	ErrConflict error = &kind{"conflict", syscall.EALREADY}
	// ErrBusy: a device is mounted or open (EBUSY).
	ErrBusy error = &kind{"busy", syscall.EBUSY}
	// ErrLost: the snapshot died with an earlier daemon (ErrnoLost).
	ErrLost error = &kind{"snapshot lost", ErrnoLost}
)

// Errno returns the errno behind err: that of the failed system call, or of
// the error's kind; 0 if there is none.
func Errno(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}
