package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// namespaceEnv marks a daemon that already runs in its own mount namespace.
const namespaceEnv = "UBLKSNAP_DAEMON_NAMESPACE"

// InPrivateNamespace reports whether this process is the re-executed daemon
// in its own mount namespace.
func InPrivateNamespace() bool { return os.Getenv(namespaceEnv) == "1" }

// ReexecInPrivateNamespace runs this program again with the same arguments
// in a new mount namespace whose mounts do not propagate from the host, so
// that the daemon never holds a mount of its own ublk devices (a mount of a
// ublk device in the serving process's namespace deadlocks its exit). It
// forwards SIGINT and SIGTERM to the child and returns the child's exit
// code. Go's unshare(2) would move only one thread, hence the re-exec; the
// runtime makes the new namespace's mounts private (MS_REC|MS_PRIVATE).
//
// The child is started from a thread marked PR_SET_IO_FLUSHER: the mark is
// inherited through fork and kept across execve, so every thread of the
// daemon (queue threads, COW goroutines, the store worker, blocking
// workers) has it from its first instruction, and none of its memory
// allocations recurse into writeback of its own devices.
func ReexecInPrivateNamespace(ctx context.Context) (int, error) {
	self, err := os.Executable()
	if err != nil {
		return 1, fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), namespaceEnv+"=1")
	// A parent killed with SIGKILL takes the child with it as a crash:
	// the filtered devices wait for the next daemon to recover them,
	// instead of being deleted under their users.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done, err := startAsIOFlusher(cmd)
	if err != nil {
		return 1, fmt.Errorf("start daemon in a private mount namespace: %w", err)
	}
	for {
		select {
		case sig := <-sigs:
			cmd.Process.Signal(sig)
		case <-ctx.Done():
			cmd.Process.Signal(syscall.SIGTERM)
			ctx = context.Background()
		case err := <-done:
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				return exit.ExitCode(), nil
			}
			if err != nil {
				return 1, err
			}
			return 0, nil
		}
	}
}

// startAsIOFlusher starts cmd from a thread marked PR_SET_IO_FLUSHER (if
// the process may set it) and
// waits for it on that same thread, whose result arrives on done. The
// thread must outlive the child: the child's parent-death signal fires
// when the thread that forked it exits. The thread stays locked, so no
// other goroutine runs on it with the mark, and ends with the goroutine.
func startAsIOFlusher(cmd *exec.Cmd) (done <-chan error, err error) {
	started := make(chan error, 1)
	waited := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		// Without CAP_SYS_RESOURCE this fails; the daemon then runs
		// without the mark, and HardenProcess says so in its log.
		_ = unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0)
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		waited <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return waited, nil
}

// HardenProcess makes the daemon a poor OOM victim and checks that it runs
// as an I/O flusher (inherited from ReexecInPrivateNamespace). Failures
// are returned for logging; the daemon works without these, less robustly.
func HardenProcess() error {
	var errs []error
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0); err != nil {
		errs = append(errs, fmt.Errorf("oom_score_adj: %w", err))
	}
	if v, err := unix.PrctlRetInt(unix.PR_GET_IO_FLUSHER, 0, 0, 0, 0); err != nil || v != 1 {
		errs = append(errs, fmt.Errorf("not an I/O flusher (PR_GET_IO_FLUSHER = %d, %v)", v, err))
	}
	return errors.Join(errs...)
}

// DropUblkMounts unmounts, in the daemon's private mount namespace only,
// every filesystem on a ublk device that the namespace copied from the
// host when it was made. A daemon started while a filtered device is
// mounted (a restart) would otherwise hold that mount itself: the user's
// umount would not end it, and a process holding a mount of a device it
// serves deadlocks in its exit.
func DropUblkMounts() error {
	mounts, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) {
		target, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", i.Major, i.Minor))
		return err != nil || !strings.HasPrefix(filepath.Base(target), "ublkb"), false
	})
	if err != nil {
		return fmt.Errorf("list own mounts: %w", err)
	}
	var errs []error
	for i := len(mounts) - 1; i >= 0; i-- { // the latest, and nested, first
		if err := unix.Unmount(mounts[i].Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s (%s) from the daemon's namespace: %w", mounts[i].Mountpoint, mounts[i].Source, err))
		}
	}
	return errors.Join(errs...)
}

// notifySystemd sends state ("READY=1", "STOPPING=1") to the service
// manager that started the daemon (sd_notify(3)), if one listens: the
// datagram socket named by NOTIFY_SOCKET, a path or an abstract name
// ("@..."). Without NOTIFY_SOCKET it does nothing. The unit needs
// NotifyAccess=all: the daemon is a child of the unit's main process (the
// namespace re-exec).
func notifySystemd(state string) error {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify %s: %w", name, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("notify %s: %w", name, err)
	}
	return nil
}
