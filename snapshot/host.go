package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/ublk"
)

// BlockServer presents a block device whose requests a ublk.Handler
// serves: ublk in production (UblkServer), a fake in host tests.
type BlockServer interface {
	// Serve creates and starts a device. The device lives until Close,
	// or until ctx ends.
	Serve(ctx context.Context, cfg ublk.Config, h ublk.Handler) (BlockDevice, error)
	// Recover serves device id again after its server died (ublk.Recover).
	Recover(ctx context.Context, id int, cfg ublk.Config, h ublk.Handler) (BlockDevice, error)
	// Scan lists the devices of the kernel, whoever serves them.
	Scan() ([]ublk.Info, error)
	// Remove stops and deletes device id.
	Remove(id int) error
}

// BlockDevice is a served block device.
type BlockDevice interface {
	// Path is the device node, /dev/ublkbN.
	Path() string
	// DevNum is the device number (st_rdev) of Path.
	DevNum() uint64
	// ID is the server's number of the device (N of /dev/ublkbN).
	ID() int
	// Close stops the device; it returns once no request is in flight.
	Close() error
	// IOMode is how the device's data moves (ublk.IOModeCopy,
	// IOModeUserCopy or IOModeZeroCopy).
	IOMode() ublk.IOMode
}

// Host is what the manager needs of the running system besides block
// devices: filesystem freezing and finding who holds a device. System is
// the real one.
type Host interface {
	// Freeze freezes every filesystem mounted from device dev and returns
	// a function that thaws them. A device with no filesystem freezes
	// nothing.
	Freeze(ctx context.Context, dev uint64) (thaw func() error, err error)
	// Thaw thaws the filesystems mounted from dev that are frozen: those
	// a daemon that died during a take left frozen.
	Thaw(ctx context.Context, dev uint64) error
	// Holders describes who has device dev (node path) mounted or open,
	// one entry each ("mounted on /mnt", "open by pid 42 (fio)"); none
	// means it may be removed.
	Holders(ctx context.Context, dev uint64, path string) ([]string, error)
}

// UblkServer serves block devices with package ublk.
type UblkServer struct{}

// Serve creates a ublk device.
func (UblkServer) Serve(ctx context.Context, cfg ublk.Config, h ublk.Handler) (BlockDevice, error) {
	return withDevNum(ublk.New(ctx, cfg, h))
}

// Recover serves a ublk device again.
func (UblkServer) Recover(ctx context.Context, id int, cfg ublk.Config, h ublk.Handler) (BlockDevice, error) {
	return withDevNum(ublk.Recover(ctx, id, cfg, h))
}

// Scan lists the ublk devices.
func (UblkServer) Scan() ([]ublk.Info, error) { return ublk.Scan() }

// Remove deletes a ublk device.
func (UblkServer) Remove(id int) error { return ublk.Remove(id) }

// withDevNum adds the device number of a served device's node.
func withDevNum(d *ublk.Device, err error) (BlockDevice, error) {
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Stat(d.Path(), &st); err != nil {
		d.Close()
		return nil, fmt.Errorf("stat %s: %w", d.Path(), err)
	}
	return &ublkDevice{Device: d, dev: st.Rdev}, nil
}

// ublkDevice is a ublk.Device with its device number.
type ublkDevice struct {
	*ublk.Device
	dev uint64 // st_rdev of the node; immutable
}

func (d *ublkDevice) DevNum() uint64 { return d.dev }

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

// mountTable is a mount table and the root its mount points are opened
// under.
type mountTable struct{ table, root string }

func mountTables(ctx context.Context) []mountTable {
	var out []mountTable
	if c := callerOf(ctx); c.MountInfo != "" {
		out = append(out, mountTable{c.MountInfo, c.Root})
	}
	return append(out, mountTable{"/proc/1/mountinfo", "/proc/1/root"}, mountTable{"/proc/self/mountinfo", ""})
}

// mount is a mount point of a device.
type mount struct {
	path string // as its table's process sees it
	open string // the same through that process's root
}

// mountsOf returns the mounts of dev, each mount once (a mount seen in
// several tables is named as the first table shows it).
func mountsOf(ctx context.Context, dev uint64) ([]mount, error) {
	major, minor := int(unix.Major(dev)), int(unix.Minor(dev))
	var out []mount
	seen := map[int]bool{}
	for _, t := range mountTables(ctx) {
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
				out = append(out, mount{path: mnt.Mountpoint, open: t.root + mnt.Mountpoint})
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
		out = append(out, "mounted on "+mp.path)
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
