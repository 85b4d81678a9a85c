package host

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/internal/caller"
)

// Filesystem freeze ioctls, _IOWR('X', 119/120, int); x/sys has no names for them.
const (
	ioctlFIFREEZE = 0xc0045877
	ioctlFITHAW   = 0xc0045878
)

// System is the Host of the running machine. The daemon lives in a
// private mount namespace, so a device's filesystems are looked for in the
// mount table of the request's caller, then in init's, then in its own,
// and their mount points are opened through the root of the table's
// process.
type System struct {
	// FreezeHolder is the command of a freeze holder process
	// (RunFreezeHolder) that freezes and later thaws the filesystems, so
	// that a daemon dying during a take never leaves them frozen (see
	// freeze.go); empty: the daemon's own threads freeze them.
	FreezeHolder []string
}

// mountTable is a mount table, the root its mount points are opened
// under, and whose view it is.
type mountTable struct {
	table string // the mountinfo file
	root  string // prefix that opens its mount points from this process
	view  string // whose view, for a mount named from it; "" for the caller's
}

// mountTables lists the tables searched for a device's mounts, the
// caller's first.
func mountTables(ctx context.Context) []mountTable {
	var out []mountTable
	if c := caller.Of(ctx); c.MountInfo != "" {
		out = append(out, mountTable{c.MountInfo, c.Root, ""})
	}
	return append(out, mountTable{"/proc/1/mountinfo", "/proc/1/root", "pid 1"}, mountTable{"/proc/self/mountinfo", "", "the daemon"})
}

// mount is a mount point of a device.
type mount struct {
	path string // as its table's process sees it
	open string // the same through that process's root
	view string // whose view path is in; "" for the caller's
}

// String names the mount for a message: its path as the caller sees it,
// or with whose view it is when only another table shows it.
func (m mount) String() string {
	if m.view == "" {
		return m.path
	}
	return fmt.Sprintf("%s (as %s sees it)", m.path, m.view)
}

// mountsOf returns the mounts of dev in the tables of the caller of ctx,
// init and the daemon.
func mountsOf(ctx context.Context, dev uint64) ([]mount, error) {
	return mountsIn(mountTables(ctx), dev)
}

// mountsIn returns the mounts of dev in tables, each mount once: a mount
// seen in several tables is named as the first table shows it.
func mountsIn(tables []mountTable, dev uint64) ([]mount, error) {
	major, minor := int(unix.Major(dev)), int(unix.Minor(dev))
	var out []mount
	seen := map[int]bool{}
	for _, t := range tables {
		f, err := os.Open(t.table)
		if err != nil {
			continue // a caller gone or /proc/1 hidden: the other tables still count
		}
		mounts, err := mountinfo.GetMountsFromReader(f, func(i *mountinfo.Info) (skip, stop bool) {
			return i.Major != major || i.Minor != minor, false
		})
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", t.table, err)
		}
		for _, mnt := range mounts {
			if !seen[mnt.ID] {
				seen[mnt.ID] = true
				out = append(out, mount{path: mnt.Mountpoint, open: t.root + mnt.Mountpoint, view: t.view})
			}
		}
	}
	return out, nil
}

// Holders finds the mounts of dev, the processes that have it open, and a
// kernel holder (a device-mapper target, swap) that an exclusive open
// reveals.
func (System) Holders(ctx context.Context, dev uint64, path string) ([]string, error) {
	mps, err := mountsOf(ctx, dev)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, mp := range mps {
		out = append(out, "mounted on "+mp.String())
	}
	out = append(out, openers(dev)...)
	if len(out) == 0 {
		f, err := os.OpenFile(path, os.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			out = append(out, fmt.Sprintf("held exclusively (%v)", err))
		} else {
			f.Close()
		}
	}
	return out, nil
}

// openers lists the processes other than this one with an open file
// descriptor on block device dev.
func openers(dev uint64) []string {
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/[0-9]*")
	self := strconv.Itoa(os.Getpid())
	var out []string
	seen := map[string]bool{}
	for _, fd := range fds {
		pid := strings.Split(fd, "/")[2]
		if pid == self || seen[pid] {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != dev {
			continue
		}
		seen[pid] = true
		comm, _ := os.ReadFile("/proc/" + pid + "/comm")
		out = append(out, fmt.Sprintf("open by pid %s (%s)", pid, strings.TrimSpace(string(comm))))
	}
	return out
}
