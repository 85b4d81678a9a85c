package storage

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotPersistent is returned by Layout for a storage that cannot be
// opened again by another process: an unnamed file that was given no name
// (NameUnnamed), or a device that is not a File.
var ErrNotPersistent = errors.New("storage: the difference storage cannot outlive this process")

// Layout describes a DiffStorage so that a successor process can open the
// same devices and go on allocating where this one stopped (Restore). It
// is plain data, for JSON.
type Layout struct {
	Devices      []LayoutDevice `json:"devices"`        // the backing devices, in order
	Blocks       []LayoutBlock  `json:"blocks"`         // the storage blocks
	Grow         *LayoutGrow    `json:"grow,omitempty"` // the growable file, if any
	Capacity     int64          `json:"capacity"`
	BlockSectors int64          `json:"block_sectors"`
	Filled       int64          `json:"filled"`
	Requested    int64          `json:"requested"`
	Overflow     bool           `json:"overflow,omitempty"`
}

// LayoutDevice is a backing device of the storage and its identity.
type LayoutDevice struct {
	Path  string `json:"path"`  // as this process opened it
	Block bool   `json:"block"` // a block device (Rdev) rather than a file (Dev, Ino)
	// Unnamed marks an unnamed file that Path names only until a
	// successor has opened it again (NameUnnamed, Restore).
	Unnamed bool   `json:"unnamed,omitempty"`
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Rdev    uint64 `json:"rdev"`
}

// LayoutBlock is one storage block: sectors of Devices[Dev].
type LayoutBlock struct {
	Dev    int   `json:"dev"`
	Sector int64 `json:"sector"`
	Count  int64 `json:"count"`
	Used   int64 `json:"used"`
	Full   bool  `json:"full,omitempty"` // in the filled list
}

// LayoutGrow is the growable file: Blocks[Block] covers it.
type LayoutGrow struct {
	Block     int   `json:"block"`
	Limit     int64 `json:"limit"`
	Allocated int64 `json:"allocated"`
}

// Layout describes the storage for Restore. The caller makes sure that
// nothing allocates meanwhile. It fails with ErrNotPersistent for an
// unnamed file without a name (NameUnnamed) or a device that is not a File.
func (ds *DiffStorage) Layout() (Layout, error) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.closed {
		return Layout{}, ErrClosed
	}
	l := Layout{Capacity: ds.capacity, BlockSectors: ds.blockSectors, Filled: ds.filled, Requested: ds.requested, Overflow: ds.overflow}
	for _, d := range ds.devs {
		f, ok := d.(*File)
		if !ok || (f.tempDir != nil && f.linked == "") {
			return Layout{}, fmt.Errorf("%s: %w", d.Name(), ErrNotPersistent)
		}
		var st unix.Stat_t
		if err := unix.Fstat(f.fd, &st); err != nil {
			return Layout{}, fmt.Errorf("stat %s: %w", f.Name(), err)
		}
		ld := LayoutDevice{Path: f.Name(), Block: f.block, Dev: st.Dev, Ino: st.Ino, Rdev: st.Rdev}
		if f.tempDir != nil {
			ld.Path, ld.Unnamed = filepath.Join(f.tempDir.Name(), f.linked), true
		}
		l.Devices = append(l.Devices, ld)
	}
	for _, list := range []struct {
		blocks []*storageBlock
		full   bool
	}{{ds.emptyBlocks, false}, {ds.filledBlocks, true}} {
		for _, b := range list.blocks {
			lb := LayoutBlock{Dev: ds.indexLocked(b.dev), Sector: b.sector, Count: b.count, Used: b.used, Full: list.full}
			if ds.grow != nil && ds.grow.block == b {
				l.Grow = &LayoutGrow{Block: len(l.Blocks), Limit: ds.grow.limit, Allocated: ds.grow.allocated}
			}
			l.Blocks = append(l.Blocks, lb)
		}
	}
	return l, nil
}

// NameUnnamed gives each unnamed file of the storage a name in its
// directory, name(i) for the i-th, so that Layout describes it (as that
// directory, as it was opened, joined with the name) and a successor
// process can open it; Restore takes the names away again, and Unname
// does when no successor will come. A name that exists fails with EEXIST.
func (ds *DiffStorage) NameUnnamed(name func(i int) string) error {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	i := 0
	for _, d := range ds.devs {
		f, ok := d.(*File)
		if !ok || f.tempDir == nil || f.linked != "" {
			continue
		}
		n := name(i)
		i++
		if err := unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", f.fd), int(f.tempDir.Fd()), n, unix.AT_SYMLINK_FOLLOW); err != nil {
			return fmt.Errorf("name the unnamed file in %s: %w", f.Name(), err)
		}
		f.linked = n
	}
	return nil
}

// Unname takes away the names NameUnnamed gave.
func (ds *DiffStorage) Unname() error {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	var errs []error
	for _, d := range ds.devs {
		if f, ok := d.(*File); ok && f.linked != "" {
			if err := unix.Unlinkat(int(f.tempDir.Fd()), f.linked, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("remove %s in %s: %w", f.linked, f.Name(), err))
			}
			f.linked = ""
		}
	}
	return errors.Join(errs...)
}

// RemoveUnnamed removes the names that l's unnamed files were given,
// where they still name the same file: for a successor that will not
// restore the storage. paths[i], when given, is the path to remove for
// l.Devices[i], as for Restore.
func (l Layout) RemoveUnnamed(paths []string) error {
	var errs []error
	for i, ld := range l.Devices {
		p := ld.Path
		if i < len(paths) {
			p = paths[i]
		}
		var st unix.Stat_t
		if !ld.Unnamed || unix.Stat(p, &st) != nil || st.Dev != ld.Dev || st.Ino != ld.Ino {
			continue
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// DeviceIndex returns the index of dev in Layout().Devices, or -1.
func (ds *DiffStorage) DeviceIndex(dev Device) int {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	return ds.indexLocked(dev)
}

func (ds *DiffStorage) indexLocked(dev Device) int {
	for i, d := range ds.devs {
		if d == dev {
			return i
		}
	}
	return -1
}

// Restore opens the devices of a Layout again and returns the storage as
// it was. paths[i], when given, is the path to open for l.Devices[i] (as
// the caller names it; the layout holds the path as it was opened). A
// device that is no longer the same file or block device is refused
// (syscall.ESTALE).
func Restore(l Layout, paths []string, opts Options) (*DiffStorage, error) {
	ds := newDiffStorage(opts)
	fail := func(err error) (*DiffStorage, error) {
		for _, d := range ds.devs {
			d.Close()
		}
		return nil, fmt.Errorf("restore difference storage: %w", err)
	}
	for i, ld := range l.Devices {
		p := ld.Path
		if i < len(paths) {
			p = paths[i]
		}
		f, err := Open(p)
		if err != nil {
			return fail(err)
		}
		ds.devs = append(ds.devs, f)
		var st unix.Stat_t
		if err := unix.Fstat(f.fd, &st); err != nil {
			return fail(err)
		}
		if f.block != ld.Block || (ld.Block && st.Rdev != ld.Rdev) || (!ld.Block && (st.Dev != ld.Dev || st.Ino != ld.Ino)) {
			return fail(fmt.Errorf("%s is no longer the device the storage used: %w", p, syscall.ESTALE))
		}
	}
	for i, lb := range l.Blocks {
		if lb.Dev < 0 || lb.Dev >= len(ds.devs) || lb.Used < 0 || lb.Used > lb.Count {
			return fail(fmt.Errorf("block %d of the layout is invalid: %w", i, syscall.EINVAL))
		}
		b := &storageBlock{dev: ds.devs[lb.Dev], sector: lb.Sector, count: lb.Count, used: lb.Used}
		if lb.Full {
			ds.filledBlocks = append(ds.filledBlocks, b)
		} else {
			ds.emptyBlocks = append(ds.emptyBlocks, b)
		}
		if l.Grow != nil && l.Grow.Block == i {
			ds.grow = &growFile{dev: b.dev, block: b, limit: l.Grow.Limit, allocated: l.Grow.Allocated}
		}
	}
	if l.Grow != nil && ds.grow == nil {
		return fail(fmt.Errorf("the layout's growable file has no block: %w", syscall.EINVAL))
	}
	// Opened again: the unnamed files lose their names, and vanish once
	// this storage closes, as they would have in the process that made them.
	for i, ld := range l.Devices {
		if f := ds.devs[i].(*File); ld.Unnamed {
			if err := f.becomeUnnamed(filepath.Dir(f.Name())); err != nil {
				return fail(err)
			}
			if err := os.Remove(f.Name()); err != nil {
				return fail(fmt.Errorf("take away the name of the unnamed file: %w", err))
			}
		}
	}
	ds.capacity, ds.blockSectors, ds.filled, ds.requested, ds.overflow = l.Capacity, l.BlockSectors, l.Filled, l.Requested, l.Overflow
	ds.mu.Lock()
	ds.lowSpace = ds.freeLocked() <= ds.lowWater
	ds.mu.Unlock()
	return ds, nil
}

// Region returns the region of count sectors at sector of Devices[dev], as
// a restored chunk map names it.
func (ds *DiffStorage) Region(dev int, sector, count int64) (DiffRegion, error) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if dev < 0 || dev >= len(ds.devs) || sector < 0 || count <= 0 || sector+count > ds.devs[dev].Geometry().Sectors()+ds.growthLocked(dev) {
		return DiffRegion{}, fmt.Errorf("region %d:%d+%d outside the difference storage: %w", dev, sector, count, syscall.EINVAL)
	}
	return DiffRegion{Dev: ds.devs[dev], Sector: sector, Count: count}, nil
}

// growthLocked is how far the growable file may have regions beyond its
// current size (handed out before fallocate caught up); 0 for others.
func (ds *DiffStorage) growthLocked(dev int) int64 {
	if ds.grow != nil && ds.grow.dev == ds.devs[dev] {
		return max(ds.grow.block.count-ds.devs[dev].Geometry().Sectors(), 0)
	}
	return 0
}
