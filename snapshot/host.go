package snapshot

import (
	"context"

	"github.com/ublksnap/ublksnap/ublk"
)

// BlockServer presents a block device whose requests a ublk.Handler
// serves: ublk in production (host.UblkServer), a fake in host tests.
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
// devices: filesystem freezing and finding who holds a device. host.System is
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
