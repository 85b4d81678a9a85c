package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// minLimit is the smallest difference storage limit a snapshot accepts.
const minLimit = 1 << 20

// takeTimeout bounds how long a take waits for in-flight writes to drain.
const takeTimeout = 30 * time.Second

// Manager is the daemon's Service: it owns the filtered devices and the
// snapshots. One mutex serialises every state change; requests that wait
// (WaitEvent) do so without it.
type Manager struct {
	params  cow.Params   // blksnap parameters for new snapshots; immutable
	version string       // reported by Status; immutable
	log     *slog.Logger // immutable

	mu        sync.Mutex
	devices   map[string]*device   // filtered devices by path (/dev/ublkbN); guarded by mu
	snapshots map[string]*snapshot // snapshots by UUID; guarded by mu
}

// device is a filtered original device.
type device struct {
	name    string        // the user's name for it; immutable
	backing string        // backing file or block device path; immutable
	file    *storage.File // the open backing device; immutable
	orig    *cow.Original // COW engine entry of the device; immutable
	gate    *gate         // admits its data-changing requests; immutable
	ublk    *ublk.Device  // the served /dev/ublkbN; immutable
	snap    *snapshot     // the snapshot it is a member of, or nil; guarded by Manager.mu
}

func (d *device) path() string { return d.ublk.Path() }

// snapshot is one snapshot and its difference storage.
type snapshot struct {
	id          string               // UUID; immutable
	storage     *storage.DiffStorage // shared by all members; immutable
	storagePath string               // where the storage was created; immutable
	createdFile string               // a storage file the daemon created (removed on destroy), or ""
	limit       uint64               // bytes; immutable
	taken       bool                 // guarded by Manager.mu
	members     []*member            // in the order added; guarded by Manager.mu
}

// member is an original device in a snapshot and, once taken, its image.
type member struct {
	dev   *device
	area  *cow.DiffArea // set by take
	image *ublk.Device  // set by take
}

// NewManager returns a Manager creating snapshots with params.
func NewManager(params cow.Params, version string, log *slog.Logger) (*Manager, error) {
	if err := params.Validate(); err != nil {
		return nil, err
	}
	return &Manager{
		params:    params,
		version:   version,
		log:       log,
		devices:   make(map[string]*device),
		snapshots: make(map[string]*snapshot),
	}, nil
}

// deviceLocked finds a filtered device by its path or name.
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
	return nil, fmt.Errorf("%w: snapshot %s not found (see ublksnap snapshot collect)", ErrNotFound, id)
}

// Attach opens the backing device and serves it as a filtered ublk device.
func (m *Manager) Attach(ctx context.Context, req api.AttachRequest) (api.Device, error) {
	if req.Queues < 0 || req.Depth < 0 {
		return api.Device{}, fmt.Errorf("%w: queues and depth must be positive", ErrInvalid)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, d := range m.devices {
		if d.backing == req.Backing {
			return api.Device{}, fmt.Errorf("%w: %s is already attached as %s", ErrConflict, req.Backing, d.path())
		}
		if req.Name != "" && d.name == req.Name {
			return api.Device{}, fmt.Errorf("%w: the name %s is taken by %s", ErrConflict, req.Name, d.path())
		}
	}
	file, err := storage.Open(req.Backing)
	if err != nil {
		return api.Device{}, fmt.Errorf("%w: attach %s: %v", ErrInvalid, req.Backing, err)
	}
	geo := file.Geometry()
	cfg := ublk.DefaultConfig(geo.Size)
	cfg.LogicalBlockSize, cfg.PhysicalBlockSize = geo.LogicalBlockSize, max(geo.PhysicalBlockSize, geo.LogicalBlockSize)
	cfg.Discard, cfg.WriteZeroes = true, true
	cfg.Logger = m.log
	if req.Queues > 0 {
		cfg.Queues = req.Queues
	}
	if req.Depth > 0 {
		cfg.Depth = req.Depth
	}
	if err := cfg.Validate(); err != nil {
		file.Close()
		return api.Device{}, fmt.Errorf("%w: attach %s: %v", ErrInvalid, req.Backing, err)
	}
	d := &device{name: req.Name, backing: req.Backing, file: file, orig: cow.NewOriginal(file), gate: newGate()}
	if d.name == "" {
		d.name = filepath.Base(req.Backing)
	}
	// The device outlives the request: it ends with Detach or Close.
	d.ublk, err = ublk.New(context.WithoutCancel(ctx), cfg, &originalHandler{orig: d.orig, gate: d.gate})
	if err != nil {
		file.Close()
		return api.Device{}, fmt.Errorf("attach %s: %w", req.Backing, err)
	}
	m.devices[d.path()] = d
	m.log.Info("attached", "device", d.path(), "backing", d.backing, "size", geo.Size)
	return d.info(), nil
}

func (d *device) info() api.Device {
	a := api.Device{Name: d.name, Path: d.path(), Backing: d.backing, Size: uint64(d.file.Geometry().Size)}
	if d.snap != nil {
		a.Snapshot = d.snap.id
	}
	return a
}

// Detach stops a filtered device that is in no snapshot.
func (m *Manager) Detach(_ context.Context, ref string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.deviceLocked(ref)
	if err != nil {
		return err
	}
	if d.snap != nil {
		return fmt.Errorf("%w: %s is in snapshot %s; destroy that first", ErrConflict, d.path(), d.snap.id)
	}
	delete(m.devices, d.path())
	return d.close()
}

// close stops the ublk device, then flushes and closes the backing device.
func (d *device) close() error {
	err := d.ublk.Close()
	if ferr := d.orig.Flush(); ferr != nil && err == nil {
		err = ferr
	}
	if cerr := d.file.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", d.path(), err)
	}
	return nil
}

// Snapshots lists the snapshot UUIDs in order.
func (m *Manager) Snapshots(context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]string, 0, len(m.snapshots))
	for id := range m.snapshots {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids, nil
}

// CreateSnapshot creates a snapshot with its difference storage and adds
// the given devices. Nothing is left behind when it fails.
func (m *Manager) CreateSnapshot(_ context.Context, req api.CreateSnapshotRequest) (api.Snapshot, error) {
	if req.Limit < minLimit {
		return api.Snapshot{}, fmt.Errorf("%w: limit %d bytes is too small: give at least 1 MiB", ErrInvalid, req.Limit)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	members := make([]*member, 0, len(req.Devices))
	for _, ref := range req.Devices {
		d, err := m.deviceLocked(ref)
		if err != nil {
			return api.Snapshot{}, err
		}
		if err := m.checkMemberLocked(d, nil, req.Storage); err != nil {
			return api.Snapshot{}, err
		}
		for _, mb := range members {
			if mb.dev == d {
				return api.Snapshot{}, fmt.Errorf("%w: %s is given twice", ErrInvalid, d.path())
			}
		}
		members = append(members, &member{dev: d})
	}
	if d := m.deviceOfPathLocked(req.Storage); d != nil {
		return api.Snapshot{}, fmt.Errorf("%w: %s is a filtered device; the difference storage must be elsewhere", ErrInvalid, req.Storage)
	}
	s := &snapshot{id: uuid.NewString(), storagePath: req.Storage, limit: req.Limit, members: members}
	if _, err := os.Stat(req.Storage); errors.Is(err, os.ErrNotExist) {
		// A file that does not exist yet is created and grown up to the limit.
		f, err := os.OpenFile(req.Storage, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return api.Snapshot{}, fmt.Errorf("%w: difference storage %s: %v", ErrInvalid, req.Storage, err)
		}
		f.Close()
		s.createdFile = req.Storage
	}
	ds, err := storage.NewFile(req.Storage, int64(req.Limit>>storage.SectorShift),
		storage.Options{MinimumSectors: m.params.DiffStorageMinimum, Logger: m.log})
	if err != nil {
		if s.createdFile != "" {
			os.Remove(s.createdFile)
		}
		return api.Snapshot{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	s.storage = ds
	for _, mb := range members {
		mb.dev.snap = s
	}
	m.snapshots[s.id] = s
	m.log.Info("snapshot created", "id", s.id, "storage", req.Storage, "limit", req.Limit, "devices", len(members))
	return s.info(), nil
}

// deviceOfPathLocked returns the filtered device whose node or backing is
// path, or nil.
func (m *Manager) deviceOfPathLocked(path string) *device {
	for _, d := range m.devices {
		if path == d.path() || path == d.backing {
			return d
		}
	}
	return nil
}

// checkMemberLocked reports why d cannot join snapshot s (nil: a new one)
// whose storage is at storagePath.
func (m *Manager) checkMemberLocked(d *device, s *snapshot, storagePath string) error {
	switch {
	case d.snap != nil && d.snap == s:
		return fmt.Errorf("%w: %s is already in snapshot %s", ErrConflict, d.path(), s.id)
	case d.snap != nil:
		return fmt.Errorf("%w: %s is in snapshot %s; a device is in one snapshot at a time", ErrConflict, d.path(), d.snap.id)
	case storagePath == d.path() || storagePath == d.backing:
		return fmt.Errorf("%w: %s holds the difference storage and cannot be a member", ErrInvalid, d.path())
	}
	return nil
}

// Snapshot describes one snapshot.
func (m *Manager) Snapshot(_ context.Context, id string) (api.Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return api.Snapshot{}, err
	}
	return s.info(), nil
}

// AddDevice adds a filtered device to a snapshot not yet taken.
func (m *Manager) AddDevice(_ context.Context, id, ref string) (api.Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return api.Snapshot{}, err
	}
	d, err := m.deviceLocked(ref)
	if err != nil {
		return api.Snapshot{}, err
	}
	if err := m.checkMemberLocked(d, s, s.storagePath); err != nil {
		return api.Snapshot{}, err
	}
	if s.taken {
		return api.Snapshot{}, fmt.Errorf("%w: snapshot %s is already taken; devices are added before", ErrConflict, id)
	}
	s.members = append(s.members, &member{dev: d})
	d.snap = s
	return s.info(), nil
}

// AppendStorage adds a file or block device, or ranges of it, to a
// snapshot's difference storage.
func (m *Manager) AppendStorage(_ context.Context, id string, req api.AppendStorageRequest) (api.Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return api.Snapshot{}, err
	}
	if d := m.deviceOfPathLocked(req.Path); d != nil {
		return api.Snapshot{}, fmt.Errorf("%w: %s is a filtered device; the difference storage must be elsewhere", ErrInvalid, req.Path)
	}
	if len(req.Ranges) == 0 {
		dev, err := storage.Open(req.Path)
		if err != nil {
			return api.Snapshot{}, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		whole := []storage.Range{{Sector: 0, Count: dev.Geometry().Sectors()}}
		if err := s.storage.AppendDevice(dev, whole); err != nil {
			return api.Snapshot{}, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	} else {
		ranges := make([]storage.Range, len(req.Ranges))
		for i, r := range req.Ranges {
			if r.Start > 1<<62 || r.Count > 1<<62 {
				return api.Snapshot{}, fmt.Errorf("%w: range %d:%d is outside any device", ErrInvalid, r.Start, r.Count)
			}
			ranges[i] = storage.Range{Sector: int64(r.Start), Count: int64(r.Count)}
		}
		if err := s.storage.Append(req.Path, ranges); err != nil {
			return api.Snapshot{}, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	return s.info(), nil
}

// Take takes a snapshot: it creates the difference areas and the image
// devices, then freezes the members' filesystems, pauses all members' writes
// at once, switches every member to COW, resumes and thaws. Any failure
// undoes everything and leaves the snapshot as it was.
func (m *Manager) Take(ctx context.Context, id string) (api.Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return api.Snapshot{}, err
	}
	switch {
	case s.taken:
		return api.Snapshot{}, fmt.Errorf("%w: snapshot %s is already taken", ErrConflict, id)
	case len(s.members) == 0:
		return api.Snapshot{}, fmt.Errorf("%w: snapshot %s has no devices; add some with ublksnap snapshot add", ErrInvalid, id)
	}
	if err := m.take(ctx, s); err != nil {
		s.release()
		return api.Snapshot{}, fmt.Errorf("take snapshot %s: %w", id, err)
	}
	s.taken = true
	m.log.Info("snapshot taken", "id", id, "devices", len(s.members))
	return s.info(), nil
}

func (m *Manager) take(ctx context.Context, s *snapshot) error {
	for _, mb := range s.members {
		area, err := cow.NewDiffArea(mb.dev.file, s.storage, m.params, m.log)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		mb.area = area
		logical, physical := area.BlockSizes()
		cfg := ublk.DefaultConfig(area.Size())
		cfg.LogicalBlockSize, cfg.PhysicalBlockSize = logical, max(physical, logical)
		cfg.Discard, cfg.WriteZeroes = true, true
		cfg.Logger = m.log
		// The image outlives the request: it ends with Destroy or Close.
		if mb.image, err = ublk.New(context.WithoutCancel(ctx), cfg, &imageHandler{area: area}); err != nil {
			return fmt.Errorf("image of %s: %w", mb.dev.path(), err)
		}
	}
	var frozen []frozenFS
	defer func() {
		if err := thawAll(frozen); err != nil {
			m.log.Error("thaw after take", "err", err)
		}
	}()
	for _, mb := range s.members {
		var st unix.Stat_t
		if err := unix.Stat(mb.dev.path(), &st); err != nil {
			return fmt.Errorf("stat %s: %w", mb.dev.path(), err)
		}
		f, err := freezeDevice(unix.Major(st.Rdev), unix.Minor(st.Rdev))
		frozen = append(frozen, f...)
		if err != nil {
			return err
		}
	}
	pctx, cancel := context.WithTimeout(ctx, takeTimeout)
	defer cancel()
	paused := 0
	defer func() {
		for _, mb := range s.members[:paused] {
			mb.dev.gate.Resume()
		}
	}()
	for _, mb := range s.members {
		if err := mb.dev.gate.Pause(pctx); err != nil {
			return fmt.Errorf("pause writes to %s: %w", mb.dev.path(), err)
		}
		paused++
	}
	for _, mb := range s.members {
		mb.dev.orig.SetDiffArea(mb.area)
	}
	for _, mb := range s.members {
		if corrupted, errno := mb.area.Corrupted(); corrupted {
			return fmt.Errorf("%w: the difference area of %s failed: %v", ErrConflict, mb.dev.path(), errno)
		}
	}
	return nil
}

// release switches the members off COW and frees the images, the areas and
// (if destroy) the storage. Images go first so that no image I/O runs while
// the areas close.
func (s *snapshot) release() error {
	var errs []error
	for _, mb := range s.members {
		if mb.image != nil {
			errs = append(errs, mb.image.Close())
			mb.image = nil
		}
	}
	for _, mb := range s.members {
		if mb.area == nil {
			continue
		}
		// A pause makes sure no write is between its COW and its write.
		if err := mb.dev.gate.Pause(context.Background()); err != nil {
			errs = append(errs, err)
		}
		mb.dev.orig.SetDiffArea(nil)
		mb.dev.gate.Resume()
		errs = append(errs, mb.area.Close())
		mb.area = nil
	}
	return errors.Join(errs...)
}

// WaitEvent waits for the snapshot's next event.
func (m *Manager) WaitEvent(ctx context.Context, id string, timeout time.Duration) (api.Event, error) {
	m.mu.Lock()
	s, err := m.snapshotLocked(id)
	m.mu.Unlock()
	if err != nil {
		return api.Event{}, err
	}
	e, err := s.storage.Events().Wait(ctx, int(timeout.Milliseconds()))
	switch {
	case errors.Is(err, storage.ErrTimeout):
		return api.Event{Code: api.EventTimeout}, nil
	case err != nil:
		return api.Event{}, err
	}
	out := api.Event{Code: e.Code.String(), Time: e.Time, RequestedSectors: uint64(e.RequestedSectors)}
	if e.Code == storage.EventCorrupted {
		out.Device, out.Errno, out.Error = e.Device, int(e.Errno), e.Errno.Error()
		m.mu.Lock()
		for _, mb := range s.members {
			if mb.dev.backing == e.Device || mb.dev.file.Name() == e.Device {
				out.Device = mb.dev.path()
			}
		}
		m.mu.Unlock()
	}
	return out, nil
}

// Destroy removes a snapshot's images and releases its storage. Without
// force it refuses while an image is open exclusively (mounted, or held by
// a program such as mkfs).
func (m *Manager) Destroy(_ context.Context, id string, force bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return err
	}
	if !force {
		for _, mb := range s.members {
			if mb.image == nil {
				continue
			}
			f, err := os.OpenFile(mb.image.Path(), os.O_RDONLY|unix.O_EXCL, 0)
			if err != nil {
				return fmt.Errorf("%w: image %s is open or mounted (%v); unmount it or use --force", ErrConflict, mb.image.Path(), err)
			}
			f.Close()
		}
	}
	delete(m.snapshots, id)
	err = s.destroy()
	m.log.Info("snapshot destroyed", "id", id, "err", err)
	return err
}

// destroy releases the members, closes the storage and removes a storage
// file the daemon created. Manager.mu must be held.
func (s *snapshot) destroy() error {
	for _, mb := range s.members {
		mb.dev.snap = nil
	}
	err := errors.Join(s.release(), s.storage.Close())
	if s.createdFile != "" {
		if rerr := os.Remove(s.createdFile); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	if err != nil {
		return fmt.Errorf("destroy snapshot %s: %w", s.id, err)
	}
	return nil
}

// SnapshotInfo reports which snapshot holds a device and its state.
func (m *Manager) SnapshotInfo(_ context.Context, ref string) (api.SnapshotInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.deviceLocked(ref)
	if err != nil {
		return api.SnapshotInfo{}, err
	}
	info := api.SnapshotInfo{Device: d.path(), State: "none"}
	if d.snap == nil {
		return info, nil
	}
	info.Snapshot, info.State = d.snap.id, d.snap.state()
	for _, mb := range d.snap.members {
		if mb.dev == d {
			mi := mb.info()
			info.Image, info.ErrorCode = mi.Image, mi.ErrorCode
			if mi.ErrorCode != 0 {
				info.State = api.StateCorrupted
			}
		}
	}
	return info, nil
}

// Status returns every device and snapshot.
func (m *Manager) Status(context.Context) (api.Status, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := api.Status{Version: m.version, Devices: []api.Device{}, Snapshots: []api.Snapshot{}}
	for _, d := range m.devices {
		st.Devices = append(st.Devices, d.info())
	}
	sort.Slice(st.Devices, func(i, j int) bool { return st.Devices[i].Path < st.Devices[j].Path })
	for _, s := range m.snapshots {
		st.Snapshots = append(st.Snapshots, s.info())
	}
	sort.Slice(st.Snapshots, func(i, j int) bool { return st.Snapshots[i].ID < st.Snapshots[j].ID })
	return st, nil
}

// state is the snapshot's state for reports.
func (s *snapshot) state() string {
	if !s.taken {
		return api.StateCreated
	}
	for _, mb := range s.members {
		if mb.area != nil {
			if corrupted, _ := mb.area.Corrupted(); corrupted {
				return api.StateCorrupted
			}
		}
	}
	return api.StateTaken
}

func (s *snapshot) info() api.Snapshot {
	st := s.storage.Stats()
	out := api.Snapshot{ID: s.id, State: s.state(), Devices: []api.SnapshotMember{},
		Storage: api.StorageInfo{
			Capacity: uint64(st.Capacity) << storage.SectorShift,
			Used:     uint64(st.Filled) << storage.SectorShift,
			Limit:    s.limit,
		}}
	for _, mb := range s.members {
		out.Devices = append(out.Devices, mb.info())
	}
	return out
}

func (mb *member) info() api.SnapshotMember {
	out := api.SnapshotMember{Device: mb.dev.path()}
	if mb.image != nil {
		out.Image = mb.image.Path()
	}
	if mb.area != nil {
		st := mb.area.Stats()
		out.ChunkSize = uint64(st.ChunkSize)
		out.ChunksCopied = uint64(st.Chunks - st.ChunksInState[cow.ChunkNew])
		if corrupted, errno := mb.area.Corrupted(); corrupted {
			out.ErrorCode = -int(errno)
		}
	}
	return out
}

// Close stops everything: snapshot images first, then the filtered devices,
// flushing every backing device.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for id, s := range m.snapshots {
		errs = append(errs, s.destroy())
		delete(m.snapshots, id)
	}
	for path, d := range m.devices {
		errs = append(errs, d.close())
		delete(m.devices, path)
	}
	return errors.Join(errs...)
}
