package snapshot

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// device is a filtered original device (blksnap's tracker): a backing
// device served as a block device whose data-changing requests pass the
// gate and the COW engine.
type device struct {
	name    string        // the user's name for it; immutable
	backing userPath      // the backing file or block device; immutable
	ident   identity      // where the backing lives; immutable
	file    *storage.File // the open backing device; immutable
	orig    *cow.Original // COW engine entry of the device; immutable
	gate    *gate         // admits its data-changing requests; immutable
	track   *cbt.Map      // change tracking of the device; immutable (the map has its lock)
	blk     BlockDevice   // the served /dev/ublkbN; immutable
	queues  int           // ublk queues asked for; immutable
	depth   int           // ublk queue depth asked for; immutable
	snap    *snapshot     // the snapshot it is a member of, or nil; guarded by Manager.mu
}

func (d *device) path() string { return d.blk.Path() }

func (d *device) info() DeviceInfo {
	a := DeviceInfo{Name: d.name, Path: d.path(), Backing: d.backing.name, Size: d.file.Geometry().Size,
		IOMode: d.blk.IOMode().String(), DirectIO: directIO(d.file)}
	if d.snap != nil {
		a.Snapshot = d.snap.id
	}
	return a
}

// AttachOptions describe a device to attach.
type AttachOptions struct {
	Backing string // absolute path of a regular file or block device
	Name    string // "" : the backing's base name
	Queues  int    // 0: ublk's default
	Depth   int    // 0: ublk's default
	// IOMode is "copy", "auto", "zero-copy" or "user-copy"; "" is the daemon's
	// default. A recovered device keeps the mode it was created in.
	IOMode string
}

// Attach opens the backing device and serves it as a filtered device.
func (m *Manager) Attach(ctx context.Context, opt AttachOptions) (DeviceInfo, error) {
	if opt.Queues < 0 || opt.Depth < 0 {
		return DeviceInfo{}, fmt.Errorf("%w: queues and depth must not be negative", ErrInvalid)
	}
	mode := m.ioMode
	if opt.IOMode != "" {
		var err error
		if mode, err = ublk.ParseIOMode(opt.IOMode); err != nil {
			return DeviceInfo{}, fmt.Errorf("%w: attach: %v", ErrInvalid, err)
		}
	}
	backing, id, err := locate(ctx, "backing", opt.Backing, false)
	if err != nil {
		return DeviceInfo{}, fmt.Errorf("attach: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, d := range m.devices {
		if d.ident.sameFile(id) {
			return DeviceInfo{}, fmt.Errorf("%w: %s is already attached as %s", ErrConflict, backing.name, d.path())
		}
		if opt.Name != "" && d.name == opt.Name {
			return DeviceInfo{}, fmt.Errorf("%w: the name %s is taken by %s", ErrConflict, opt.Name, d.path())
		}
	}
	if err := m.checkOffServedLocked("backing", backing, id); err != nil {
		return DeviceInfo{}, err
	}
	for _, s := range m.snapshots {
		if s.storageIdent.sameFile(id) {
			return DeviceInfo{}, fmt.Errorf("%w: %s holds the difference storage of snapshot %s", ErrConflict, backing.name, s.id)
		}
	}
	file, err := m.openBacking(backing)
	if err != nil {
		return DeviceInfo{}, fmt.Errorf("attach %s: %w", backing.name, err)
	}
	geo := file.Geometry()
	cfg := m.deviceConfig(file, mode, m.state.path != "")
	if opt.Queues > 0 {
		cfg.Queues = opt.Queues
	}
	if opt.Depth > 0 {
		cfg.Depth = opt.Depth
	}
	if err := cfg.Validate(); err != nil {
		file.Close()
		return DeviceInfo{}, fmt.Errorf("%w: attach %s: %v", ErrInvalid, backing.name, err)
	}
	d := &device{name: opt.Name, backing: backing, ident: id, file: file, orig: cow.NewOriginal(file), gate: newGate(),
		queues: cfg.Queues, depth: cfg.Depth}
	if d.name == "" {
		d.name = filepath.Base(backing.name)
	}
	d.track = m.loadCBT(d)
	// The device outlives the request: it ends with Detach or Close.
	d.blk, err = m.server.Serve(context.WithoutCancel(ctx), cfg, newOriginalHandler(d.orig, d.gate, d.track, m.log))
	if err != nil {
		file.Close()
		return DeviceInfo{}, fmt.Errorf("attach %s: %w", backing.name, err)
	}
	m.devices[d.path()] = d
	// Written under m.mu: a failure takes the device away again before
	// any other request can see it.
	if err := m.saveLocked(); err != nil {
		delete(m.devices, d.path())
		return DeviceInfo{}, errors.Join(fmt.Errorf("attach %s: %w", backing.name, err), d.close())
	}
	m.log.Info("attached", "device", d.path(), "backing", backing.name, "size", geo.Size)
	return d.info(), nil
}

// Detach stops a filtered device that is in no snapshot. Without force it
// refuses while the device is mounted or open; who holds it is found
// without Manager.mu (it scans /proc), and the device is looked up again
// after.
func (m *Manager) Detach(ctx context.Context, ref string, force bool) error {
	m.mu.Lock()
	d, err := m.detachableLocked(ref)
	m.mu.Unlock()
	if err != nil {
		return err
	}
	if !force {
		if err := m.checkUnused(ctx, d.blk); err != nil {
			return fmt.Errorf("detach %s: %w", d.path(), err)
		}
	}
	m.mu.Lock()
	again, err := m.detachableLocked(ref)
	if err == nil && again != d {
		err = fmt.Errorf("%w: %s was detached meanwhile", ErrNotFound, ref)
	}
	if err != nil {
		m.mu.Unlock()
		return err
	}
	delete(m.devices, d.path())
	saveErr := m.unlockSaving()
	m.log.Info("detaching", "device", d.path(), "force", force)
	return errors.Join(m.closeDevice(d), saveErr)
}

// detachableLocked finds the device ref and checks that it is in no
// snapshot.
func (m *Manager) detachableLocked(ref string) (*device, error) {
	d, err := m.deviceLocked(ref)
	if err != nil {
		return nil, err
	}
	if d.snap != nil {
		return nil, fmt.Errorf("%w: %s is in snapshot %s; destroy that first", ErrConflict, d.path(), d.snap.id)
	}
	return d, nil
}

// checkUnused fails with ErrBusy, naming the holders, while one of blks
// is mounted or open. It reads the mount tables and /proc: call it
// without Manager.mu.
func (m *Manager) checkUnused(ctx context.Context, blks ...BlockDevice) error {
	for _, blk := range blks {
		holders, err := m.host.Holders(ctx, blk.DevNum(), blk.Path())
		if err != nil {
			return fmt.Errorf("find who holds %s: %w", blk.Path(), err)
		}
		if len(holders) > 0 {
			return fmt.Errorf("%w: %s is open or mounted (%s); unmount or close it, or use --force", ErrBusy, blk.Path(), strings.Join(holders, ", "))
		}
	}
	return nil
}

// deviceConfig is the ublk configuration of a filtered device over dev in
// I/O mode mode, tagged as ours; a recoverable one outlives the daemon.
func (m *Manager) deviceConfig(dev storage.Device, mode ublk.IOMode, recoverable bool) ublk.Config {
	cfg := DeviceConfig(dev, m.log)
	if cfg.Files != nil {
		cfg.IOMode = mode
	}
	cfg.Owner = m.owner
	cfg.Recoverable = recoverable
	return cfg
}

// openBacking opens the backing of a filtered device, past the page cache
// where its file system allows (the device's own page cache is the one
// that counts), and logs why not otherwise (but for a backing in memory,
// which never is).
func (m *Manager) openBacking(backing userPath) (*storage.File, error) {
	file, err := storage.OpenWith(backing.open, storage.OpenOptions{Direct: true})
	if err == nil && file.DirectIOError() != nil && !file.InMemory() {
		m.log.Info("the backing is read and written through the page cache", "backing", backing.name, "reason", file.DirectIOError())
	}
	return file, err
}

// directIO reports whether dev's data path is O_DIRECT.
func directIO(dev storage.Device) bool {
	d, ok := dev.(interface{ DirectIO() bool })
	return ok && d.DirectIO()
}

// closeDevice stops a device taken out of the manager and keeps the
// change tracking map of a backing file for its next attach.
func (m *Manager) closeDevice(d *device) error {
	if d.ident.rdev != 0 {
		return d.close()
	}
	var saveErr error
	err := d.closeThen(func() {
		// Every write is done: the map is whole until the file changes.
		saveErr = m.saveCBT(d)
	})
	if err == nil && saveErr != nil {
		m.log.Warn("change tracking will start a new generation at the next attach", "backing", d.backing.name, "err", saveErr)
	}
	return err
}

// close stops the served device, then flushes and closes the backing device.
func (d *device) close() error { return d.closeThen(nil) }

// closeThen is close, running last (if not nil and all went well) after
// the last write and before the backing is closed.
func (d *device) closeThen(last func()) error {
	err := errors.Join(d.blk.Close(), d.orig.Flush())
	if err == nil && last != nil {
		last()
	}
	err = errors.Join(err, d.file.Close())
	if err != nil {
		return fmt.Errorf("detach %s: %w", d.path(), err)
	}
	return nil
}
