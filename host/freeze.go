package host

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Freezing a filesystem syncs it: writeback to the device being frozen,
// which this daemon serves. A daemon thread blocked in FIFREEZE when the
// daemon dies keeps the dying process (and its /dev/ublkcN) alive while
// that writeback waits for a new server, which cannot start until the
// character device is closed: a deadlock, and a filesystem left frozen.
// A freeze holder is a separate process that freezes, waits on a pipe and
// thaws when the daemon says so or dies (the pipe ends): the daemon then
// exits at once, and the holder's freeze and thaw finish once the next
// daemon serves the device.

// frozenMark is the holder's answer once every filesystem is frozen.
const frozenMark = "frozen"

// Freeze freezes every filesystem mounted from dev, in a freeze holder
// process when s.FreezeHolder is set.
func (s System) Freeze(ctx context.Context, dev uint64) (func() error, error) {
	mps, err := mountsOf(ctx, dev)
	if err != nil {
		return nil, err
	}
	if len(mps) == 0 {
		return func() error { return nil }, nil
	}
	if len(s.FreezeHolder) == 0 {
		return freezeMounts(mps)
	}
	return s.holdFreeze(mps)
}

// holdFreeze runs a freeze holder for mps and waits for its answer.
func (s System) holdFreeze(mps []mount) (func() error, error) {
	args := append([]string{}, s.FreezeHolder[1:]...)
	for _, mp := range mps {
		args = append(args, mp.open)
	}
	cmd := exec.Command(s.FreezeHolder[0], args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start freeze holder: %w", err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != frozenMark {
		in.Close()
		err := cmd.Wait()
		return nil, fmt.Errorf("freeze %s: %s (%v)", mps[0], strings.TrimSpace(stderr.String()), err)
	}
	return func() error {
		in.Close()
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("thaw %s: %s (%v)", mps[0], strings.TrimSpace(stderr.String()), err)
		}
		return nil
	}, nil
}

// RunFreezeHolder is the body of a freeze holder process: it freezes the
// filesystems mounted at paths, writes "frozen" to out, and thaws them
// when in ends, whether the daemon closed it or died. On a failure it
// thaws what it froze and returns the error.
//
// Its freeze may end long after the daemon died (the writeback waits for
// the next daemon, which may already have tried to thaw): the answer then
// meets a closed pipe, and the holder must live to thaw. So it ignores
// SIGPIPE, which would otherwise kill a Go program writing to a closed
// standard output, and leave the filesystem frozen for good.
func RunFreezeHolder(paths []string, in io.Reader, out io.Writer) error {
	signal.Ignore(syscall.SIGPIPE)
	mps := make([]mount, len(paths))
	for i, p := range paths {
		mps[i] = mount{path: p, open: p}
	}
	thaw, err := freezeMounts(mps)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintln(out, frozenMark); err != nil {
		return errors.Join(err, thaw())
	}
	io.Copy(io.Discard, in)
	return thaw()
}

// freezeMounts freezes the filesystems of mps with FIFREEZE and returns
// the function that thaws them; on failure it thaws what it froze.
//
// Each mount point stays open from its freeze to its thaw, and the thaw
// goes through that open directory: the path may lead through the root of
// a caller (/proc/PID/root) that is gone by then, as when a take's client
// ended because its daemon was killed while the holder's freeze waited
// for writeback. Reopening the path would then fail and leave the
// filesystem frozen for good.
func freezeMounts(mps []mount) (func() error, error) {
	type frozenMount struct {
		mp  mount
		dir *os.File
	}
	var frozen []frozenMount
	thaw := func() error {
		var errs []error
		for _, f := range frozen {
			errs = append(errs, fsIoctl(f.dir, f.mp, "thaw", ioctlFITHAW))
			f.dir.Close()
		}
		frozen = nil
		return errors.Join(errs...)
	}
	for _, mp := range mps {
		dir, err := os.Open(mp.open)
		if err != nil {
			thaw()
			return nil, fmt.Errorf("freeze %s: %w", mp, err)
		}
		err = fsIoctl(dir, mp, "freeze", ioctlFIFREEZE)
		switch {
		case err == nil:
			frozen = append(frozen, frozenMount{mp, dir})
			continue
		case errors.Is(err, unix.EBUSY): // a second mount of a frozen filesystem
			err = nil
		}
		dir.Close()
		if err != nil {
			thaw()
			return nil, err
		}
	}
	return thaw, nil
}

// Thaw thaws every filesystem mounted from dev; one that is not frozen
// is left as it is.
func (System) Thaw(ctx context.Context, dev uint64) error {
	mps, err := mountsOf(ctx, dev)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mps {
		dir, err := os.Open(mp.open)
		if err != nil {
			errs = append(errs, fmt.Errorf("thaw %s: %w", mp, err))
			continue
		}
		if err := fsIoctl(dir, mp, "thaw", ioctlFITHAW); !errors.Is(err, unix.EINVAL) {
			errs = append(errs, err)
		}
		dir.Close()
	}
	return errors.Join(errs...)
}

// fsIoctl applies FIFREEZE or FITHAW (req, named what) to the filesystem
// of dir, the open mount point mp.
func fsIoctl(dir *os.File, mp mount, what string, req uint) error {
	if err := unix.IoctlSetInt(int(dir.Fd()), req, 0); err != nil {
		return fmt.Errorf("%s %s: %w", what, mp, err)
	}
	return nil
}
