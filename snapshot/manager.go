package snapshot

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// Defaults of Config.
const (
	// DefaultTakeTimeout bounds how long a take waits for in-flight
	// writes to drain.
	DefaultTakeTimeout = 30 * time.Second
	// DefaultDestroyTimeout bounds how long a destroy waits for a
	// snapshot's I/O to end before it leaves the rest to the background.
	DefaultDestroyTimeout = 30 * time.Second
)

// minLimit is the smallest difference storage limit a snapshot accepts.
const minLimit = 1 << 20

// Config configures a Manager.
type Config struct {
	Params         cow.Params    // blksnap's parameters for new snapshots
	Logger         *slog.Logger  // nil: slog.Default()
	Server         BlockServer   // serves the block devices (host.UblkServer); required
	Host           Host          // freezes and finds holders (host.System); required
	TakeTimeout    time.Duration // 0: DefaultTakeTimeout
	DestroyTimeout time.Duration // 0: DefaultDestroyTimeout
	// IOMode is the I/O mode of filtered devices attached without one of
	// their own (AttachOptions.IOMode); the zero value is copy mode, the
	// daemon asks for ublk.IOModeAuto. Images run in user copy where the
	// kernel has it (their data passes through the engine), else copy.
	IOMode ublk.IOMode
	// StatePath is the state file through which a successor daemon
	// serves the filtered devices again (see Recover); "" keeps none, and
	// the devices then end with the daemon.
	StatePath string
}

// Manager owns the filtered devices and the snapshots; see the package
// documentation for the model.
type Manager struct {
	params         cow.Params        // immutable
	buffers        *cow.BufferBudget // every diff area's chunk buffers, params.DiffBufferMemoryLimit bytes; immutable
	log            *slog.Logger      // immutable
	server         BlockServer       // immutable
	host           Host              // immutable
	takeTimeout    time.Duration     // immutable
	destroyTimeout time.Duration     // immutable
	owner          uint64            // tag of our ublk devices (ownerTag); immutable
	ioMode         ublk.IOMode       // I/O mode of filtered devices by default; immutable

	state stateWriter // writes the state file; see its fields for their locks

	mu        sync.Mutex
	devices   map[string]*device       // filtered devices by node path; guarded by mu
	snapshots map[string]*snapshot     // snapshots by UUID; guarded by mu
	lost      map[string]*lostSnapshot // snapshots an earlier daemon died with, by UUID; guarded by mu

	freezing    []string          // nodes whose filesystems a take is freezing now; guarded by mu
	unrecovered []RecoveryFailure // devices Recover could not serve again; guarded by mu
	declared    []Declared        // what AttachDeclared did at the start; guarded by mu
	leaving     []snapshotEntry   // snapshots Leave saved for the next daemon; guarded by mu

	shutdownOnce sync.Once
	shutdown     chan struct{} // closed when Shutdown accepted a stop for good
}

// New returns a Manager with no devices.
func New(cfg Config) (*Manager, error) {
	if err := cfg.Params.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if cfg.Server == nil || cfg.Host == nil {
		return nil, fmt.Errorf("%w: Config.Server and Config.Host are required", ErrInvalid)
	}
	m := &Manager{
		params:         cfg.Params,
		buffers:        cow.NewBufferBudget(cfg.Params.DiffBufferMemoryLimit),
		log:            cfg.Logger,
		server:         cfg.Server,
		host:           cfg.Host,
		takeTimeout:    cfg.TakeTimeout,
		destroyTimeout: cfg.DestroyTimeout,
		state:          stateWriter{path: cfg.StatePath},
		owner:          ownerTag(cfg.StatePath),
		ioMode:         cfg.IOMode,
		devices:        make(map[string]*device),
		snapshots:      make(map[string]*snapshot),
		lost:           make(map[string]*lostSnapshot),
		shutdown:       make(chan struct{}),
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.takeTimeout <= 0 {
		m.takeTimeout = DefaultTakeTimeout
	}
	if m.destroyTimeout <= 0 {
		m.destroyTimeout = DefaultDestroyTimeout
	}
	return m, nil
}

// State is a snapshot's state.
type State string

// Snapshot states.
const (
	StateCreated   State = "created"   // devices and storage may still be added
	StateTaken     State = "taken"     // images are served
	StateCorrupted State = "corrupted" // at least one member's diff area failed
	StateNone      State = "none"      // (DeviceState) the device is in no snapshot
	StateLost      State = "lost"      // an earlier daemon died with it (ErrnoLost)
)

// DeviceInfo describes a filtered device.
type DeviceInfo struct {
	Name     string // the user's name for it
	Path     string // /dev/ublkbN
	Backing  string // the backing file or block device, as named
	Size     int64  // bytes
	Snapshot string // UUID of the snapshot it is in, or ""
	IOMode   string // how its data moves: "copy", "user-copy" or "zero-copy"
	DirectIO bool   // the backing is read and written with O_DIRECT
}

// SnapshotInfo describes a snapshot.
type SnapshotInfo struct {
	ID      string
	State   State
	Members []MemberInfo
	Storage StorageInfo
}

// MemberInfo is one original device of a snapshot and its image.
type MemberInfo struct {
	Device       string        // the filtered device's node
	Image        string        // the image's node once taken
	ImageIOMode  string        // how the image's data moves, once taken
	ChunkSize    int64         // bytes, once taken
	ChunksCopied int64         // chunks no longer New
	KernelCopied int64         // of those, chunks saved by an in-kernel copy (Params.ChunkCopyInKernel)
	InMemory     int64         // of those, chunks held in the daemon's memory, not yet in the storage
	Errno        syscall.Errno // what corrupted the member, or 0
}

// StorageInfo is a difference storage's accounting, in bytes.
type StorageInfo struct {
	Capacity int64
	Used     int64
	Limit    int64
}

// DeviceState answers "which snapshot holds this device, and how is it".
type DeviceState struct {
	Device   string
	Snapshot string
	State    State
	Image    string
	Errno    syscall.Errno
}

// Status is the whole state.
type Status struct {
	Devices   []DeviceInfo
	Snapshots []SnapshotInfo
	// Unrecovered are the devices of an earlier daemon that Recover could
	// not serve again (and deleted, or left to the process serving them).
	Unrecovered []RecoveryFailure
	// Declared are the devices the host's configuration declares, and
	// what became of each at the daemon's start (AttachDeclared).
	Declared []Declared
}

// deviceLocked finds a filtered device by its node or name.
func (m *Manager) deviceLocked(ref string) (*device, error) {
	if ref == "" {
		return nil, fmt.Errorf("%w: no device given", ErrInvalid)
	}
	if d, ok := m.devices[ref]; ok {
		return d, nil
	}
	for _, d := range m.devices {
		if d.name == ref {
			return d, nil
		}
	}
	return nil, fmt.Errorf("%w: unknown device %s (see ublksnap status)", ErrNotFound, ref)
}

// snapshotLocked finds a snapshot by UUID.
func (m *Manager) snapshotLocked(id string) (*snapshot, error) {
	if s, ok := m.snapshots[id]; ok {
		return s, nil
	}
	if _, ok := m.lost[id]; ok {
		return nil, fmt.Errorf("%w: snapshot %s died with an earlier daemon; destroy it to forget it", ErrLost, id)
	}
	return nil, fmt.Errorf("%w: snapshot %s not found (see ublksnap snapshot collect)", ErrNotFound, id)
}

// checkOffServedLocked refuses a path that is one of the served devices or
// lives on a filesystem of one: storage or a backing there would write
// through the COW path of the device it serves (the difference storage
// into its own snapshot) and can deadlock under writeback.
func (m *Manager) checkOffServedLocked(what string, p userPath, id identity) error {
	for _, d := range m.devices {
		if id.on(d.blk.DevNum()) {
			return fmt.Errorf("%w: %s %s is on the filtered device %s; put it on a device ublksnap does not serve", ErrInvalid, what, p.name, d.path())
		}
	}
	for _, s := range m.snapshots {
		for _, mb := range s.members {
			if mb.image != nil && id.on(mb.image.DevNum()) {
				return fmt.Errorf("%w: %s %s is on the snapshot image %s; put it on a device ublksnap does not serve", ErrInvalid, what, p.name, mb.image.Path())
			}
		}
	}
	return nil
}

// Snapshots lists the snapshot UUIDs in order.
func (m *Manager) Snapshots(context.Context) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]string, 0, len(m.snapshots)+len(m.lost))
	for id := range m.snapshots {
		ids = append(ids, id)
	}
	for id := range m.lost {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Status returns every device and snapshot, in order.
func (m *Manager) Status(context.Context) Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := Status{Devices: []DeviceInfo{}, Snapshots: []SnapshotInfo{}}
	for _, d := range m.devices {
		st.Devices = append(st.Devices, d.info())
	}
	sort.Slice(st.Devices, func(i, j int) bool { return st.Devices[i].Path < st.Devices[j].Path })
	for _, s := range m.snapshots {
		st.Snapshots = append(st.Snapshots, s.info())
	}
	for _, l := range m.lost {
		st.Snapshots = append(st.Snapshots, l.info())
	}
	st.Unrecovered = slices.Clone(m.unrecovered)
	st.Declared = slices.Clone(m.declared)
	sort.Slice(st.Snapshots, func(i, j int) bool { return st.Snapshots[i].ID < st.Snapshots[j].ID })
	return st
}

// Shutdown asks for a stop for good: it refuses (ErrBusy, naming the
// holders) while a filtered device or an image is mounted or open, unless
// force; then ShutdownRequested is closed, and the daemon is expected to
// stop answering and Close.
func (m *Manager) Shutdown(ctx context.Context, force bool) error {
	if !force {
		m.mu.Lock()
		var blks []BlockDevice
		for _, d := range m.devices {
			blks = append(blks, d.blk)
		}
		for _, s := range m.snapshots {
			blks = append(blks, s.imagesLocked()...)
		}
		m.mu.Unlock()
		if err := m.checkUnused(ctx, blks...); err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
	}
	m.shutdownOnce.Do(func() { close(m.shutdown) })
	return nil
}

// ShutdownRequested is closed once Shutdown accepted a stop for good.
func (m *Manager) ShutdownRequested() <-chan struct{} { return m.shutdown }

// lockNoTake locks m.mu at a moment no take runs (takes run without it),
// for a step that ends every snapshot. It waits for running takes with
// the lock released.
func (m *Manager) lockNoTake() {
	m.mu.Lock()
	for {
		var running chan struct{}
		for _, s := range m.snapshots {
			if s.taking != nil {
				running = s.taking
				break
			}
		}
		if running == nil {
			return
		}
		m.mu.Unlock()
		<-running
		m.mu.Lock()
	}
}

// removeSnapshotsLocked takes every snapshot out of the manager and
// returns them, for the caller to tear down without the lock.
func (m *Manager) removeSnapshotsLocked() []*snapshot {
	snaps := make([]*snapshot, 0, len(m.snapshots))
	for id, s := range m.snapshots {
		snaps = append(snaps, s)
		delete(m.snapshots, id)
	}
	return snaps
}

// Close stops everything: the snapshots first, then the filtered devices,
// flushing every backing device.
func (m *Manager) Close() error {
	m.lockNoTake()
	snaps := m.removeSnapshotsLocked()
	m.mu.Unlock()
	var errs []error
	for _, s := range snaps {
		errs = append(errs, m.teardown(s))
	}
	m.mu.Lock()
	devs := make([]*device, 0, len(m.devices))
	for p, d := range m.devices {
		devs = append(devs, d)
		delete(m.devices, p)
	}
	m.mu.Unlock()
	for _, d := range devs {
		errs = append(errs, m.closeDevice(d))
	}
	m.mu.Lock()
	errs = append(errs, m.unlockSaving())
	return errors.Join(errs...)
}

// storageSectors converts a byte count to whole sectors.
func storageSectors(bytes int64) int64 { return bytes >> storage.SectorShift }
