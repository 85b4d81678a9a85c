package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
)

// snapshot is one snapshot (blksnap's struct snapshot) and its difference
// storage.
type snapshot struct {
	id           string               // UUID; immutable
	storage      *storage.DiffStorage // shared by all members; immutable
	storageIdent identity             // where the storage lives; immutable
	created      *createdFile         // a storage file the manager created, or nil; immutable
	storageName  string               // the storage as the user named it; immutable
	// storagePaths maps each path the storage opened to the path the
	// user gave (Save records the latter); guarded by Manager.mu.
	storagePaths map[string]string
	limit        int64     // bytes; immutable
	taken        bool      // the members are in COW and have images; guarded by Manager.mu
	members      []*member // in the order added; guarded by Manager.mu
	// taking is closed when the take that runs ends; nil while none runs
	// (Take). Guarded by Manager.mu.
	taking chan struct{}
	// ended is closed (once, by end) when the snapshot leaves the manager
	// for good: its image readers stop.
	ended   chan struct{}
	endOnce sync.Once
}

func newSnapshot(id string, storagePaths map[string]string) *snapshot {
	return &snapshot{id: id, storagePaths: storagePaths, ended: make(chan struct{})}
}

// end tells the snapshot's image readers that it is going away.
func (s *snapshot) end() { s.endOnce.Do(func() { close(s.ended) }) }

// member is an original device in a snapshot and, once taken, its image
// (blksnap's snapimage).
type member struct {
	dev   *device       // immutable
	area  *cow.DiffArea // set by take, before the switch to COW; guarded by Manager.mu once the take is done
	image BlockDevice   // set by take, after the switch to COW; guarded by Manager.mu once the take is done
}

// CreateOptions describe a new snapshot.
type CreateOptions struct {
	Devices []string // nodes or names of filtered devices
	// Storage is an absolute path: a regular file (created if missing,
	// grown up to Limit), a directory (an unnamed temporary file in it)
	// or a block device (used up to Limit).
	Storage string
	Limit   int64 // bytes
	// Force allows an existing, non-empty regular file as Storage.
	Force bool
}

// CreateSnapshot creates a snapshot with its difference storage and adds
// the given devices. Nothing is left behind when it fails.
func (m *Manager) CreateSnapshot(ctx context.Context, opt CreateOptions) (SnapshotInfo, error) {
	if opt.Limit < minLimit {
		return SnapshotInfo{}, fmt.Errorf("%w: limit %d bytes is too small: give at least 1 MiB", ErrInvalid, opt.Limit)
	}
	p, id, err := locate(ctx, "difference storage", opt.Storage, true)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if err := checkStorageFile(p, id, opt.Force); err != nil {
		return SnapshotInfo{}, err
	}
	m.mu.Lock()
	info, err := m.createSnapshotLocked(opt, p, id)
	if err != nil {
		m.mu.Unlock()
		return SnapshotInfo{}, err
	}
	m.unlockSavingOrWarn()
	m.log.Info("snapshot created", "id", info.ID, "storage", p.name, "limit", opt.Limit, "devices", len(info.Members))
	return info, nil
}

// createSnapshotLocked creates the storage of a snapshot and records it.
// Its storage is created with m.mu held, so that no other snapshot takes
// the same file meanwhile.
func (m *Manager) createSnapshotLocked(opt CreateOptions, p userPath, id identity) (SnapshotInfo, error) {
	err := m.checkStorageLocked(p, id)
	if err != nil {
		return SnapshotInfo{}, err
	}
	s := newSnapshot(uuid.NewString(), map[string]string{p.open: p.name})
	s.storageIdent, s.storageName, s.limit = id, p.name, opt.Limit
	for _, ref := range opt.Devices {
		d, err := m.deviceLocked(ref)
		if err != nil {
			return SnapshotInfo{}, err
		}
		if err := s.checkMember(d); err != nil {
			return SnapshotInfo{}, err
		}
		s.members = append(s.members, &member{dev: d})
	}
	if !id.exists {
		if s.created, err = createFile(p.open); err != nil {
			return SnapshotInfo{}, fmt.Errorf("difference storage: %w", err)
		}
		if created, err := identify(p.open); err == nil {
			s.storageIdent = created
		}
	}
	s.storage, err = storage.NewFile(p.open, storageSectors(opt.Limit),
		storage.Options{MinimumSectors: m.params.DiffStorageMinimum, Logger: m.log})
	if err != nil {
		if s.created != nil {
			s.created.remove()
		}
		if errors.Is(err, syscall.EOPNOTSUPP) { // procfs, sysfs: the path given cannot hold one
			return SnapshotInfo{}, fmt.Errorf("%w: difference storage %s: its file system cannot hold one (%v); give a directory or a file on a disk or tmpfs",
				ErrInvalid, p.name, err)
		}
		return SnapshotInfo{}, fmt.Errorf("difference storage %s: %w", p.name, err)
	}
	for _, mb := range s.members {
		mb.dev.snap = s
	}
	m.snapshots[s.id] = s
	return s.info(), nil
}

// checkStorageFile refuses, unless force, an existing regular file that
// holds data: the difference storage would overwrite it. A file of holes
// (made with truncate or fallocate, as storage files are prepared) is
// taken as it is.
func checkStorageFile(p userPath, id identity, force bool) error {
	if !id.exists || id.rdev != 0 || force {
		return nil
	}
	f, err := os.Open(p.open)
	if err != nil {
		return fmt.Errorf("difference storage %s: %w", p.name, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return err
	}
	at, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return nil // no data at all
	}
	if err != nil {
		return fmt.Errorf("difference storage %s: look for data: %w", p.name, err)
	}
	return fmt.Errorf("%w: %s holds data (at byte %d of %d) that the difference storage would overwrite; remove it, name a new file or a directory, or use --force", ErrConflict, p.name, at, fi.Size())
}

// checkStorageLocked refuses difference storage on a served device or on
// the backing of a filtered device.
func (m *Manager) checkStorageLocked(p userPath, id identity) error {
	if err := m.checkOffServedLocked("difference storage", p, id); err != nil {
		return err
	}
	for _, d := range m.devices {
		if d.ident.sameFile(id) {
			return fmt.Errorf("%w: %s is the backing of %s; the difference storage must be elsewhere", ErrInvalid, p.name, d.path())
		}
	}
	return nil
}

// memberPaths returns the nodes of the members; the caller holds
// Manager.mu.
func (s *snapshot) memberPaths() []string {
	out := make([]string, len(s.members))
	for i, mb := range s.members {
		out[i] = mb.dev.path()
	}
	return out
}

// checkMember reports why d cannot join s.
func (s *snapshot) checkMember(d *device) error {
	switch {
	case d.snap != nil && d.snap == s:
		return fmt.Errorf("%w: %s is already in snapshot %s", ErrConflict, d.path(), s.id)
	case d.snap != nil:
		return fmt.Errorf("%w: %s is in snapshot %s; a device is in one snapshot at a time", ErrConflict, d.path(), d.snap.id)
	case d.ident.sameFile(s.storageIdent):
		return fmt.Errorf("%w: %s holds the difference storage and cannot be a member", ErrInvalid, d.path())
	}
	for _, mb := range s.members {
		if mb.dev == d {
			return fmt.Errorf("%w: %s is given twice", ErrInvalid, d.path())
		}
	}
	return nil
}

// SnapshotInfo describes one snapshot.
func (m *Manager) Snapshot(_ context.Context, id string) (SnapshotInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l, ok := m.lost[id]; ok {
		return l.info(), nil
	}
	s, err := m.snapshotLocked(id)
	if err != nil {
		return SnapshotInfo{}, err
	}
	return s.info(), nil
}

// AddDevice adds a filtered device to a snapshot not yet taken.
func (m *Manager) AddDevice(_ context.Context, id, ref string) (SnapshotInfo, error) {
	m.mu.Lock()
	info, err := m.addDeviceLocked(id, ref)
	if err != nil {
		m.mu.Unlock()
		return SnapshotInfo{}, err
	}
	m.unlockSavingOrWarn()
	return info, nil
}

func (m *Manager) addDeviceLocked(id, ref string) (SnapshotInfo, error) {
	s, err := m.snapshotLocked(id)
	if err != nil {
		return SnapshotInfo{}, err
	}
	d, err := m.deviceLocked(ref)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if err := s.checkMember(d); err != nil {
		return SnapshotInfo{}, err
	}
	if s.taken || s.taking != nil {
		return SnapshotInfo{}, fmt.Errorf("%w: snapshot %s is already taken; devices are added before", ErrConflict, id)
	}
	s.members = append(s.members, &member{dev: d})
	d.snap = s
	return s.info(), nil
}

// AppendStorage adds a file or block device, or sector ranges of it, to a
// snapshot's difference storage. A range with a negative start or count,
// as a user may give it, is refused with ErrInvalid.
func (m *Manager) AppendStorage(ctx context.Context, id, path string, ranges []storage.Range) (SnapshotInfo, error) {
	p, ident, err := locate(ctx, "storage", path, false)
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("append: %w", err)
	}
	for _, r := range ranges {
		if r.Start < 0 || r.Count < 0 {
			return SnapshotInfo{}, fmt.Errorf("%w: range %d:%d is outside any device", ErrInvalid, r.Start, r.Count)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if err := m.checkStorageLocked(p, ident); err != nil {
		return SnapshotInfo{}, err
	}
	if err := s.storage.Append(p.open, ranges); err != nil {
		return SnapshotInfo{}, fmt.Errorf("append storage %s: %w", p.name, err)
	}
	s.storagePaths[p.open] = p.name
	return s.info(), nil
}

// Take takes a snapshot (blksnap's snapshot_take): it creates the
// difference areas, freezes the members' filesystems, pauses all members'
// writes at once, switches every member to COW, resumes and thaws, and
// only then creates the images, so that an image shows the snapshot
// instant from the first byte anyone can read. Any failure undoes
// everything and leaves the snapshot as it was.
//
// The take runs without Manager.mu (a freeze may take Config.TakeTimeout):
// the snapshot is marked as being taken meanwhile, so that no device is
// added to it, no second take starts, and Destroy, Leave and Close wait
// for it. Its members get their areas and images when it has succeeded.
func (m *Manager) Take(ctx context.Context, id string) (SnapshotInfo, error) {
	m.mu.Lock()
	s, err := m.snapshotLocked(id)
	switch {
	case err != nil:
	case s.taken:
		err = fmt.Errorf("%w: snapshot %s is already taken", ErrConflict, id)
	case s.taking != nil:
		err = fmt.Errorf("%w: snapshot %s is being taken", ErrConflict, id)
	case len(s.members) == 0:
		err = fmt.Errorf("%w: snapshot %s has no devices; add some with ublksnap snapshot add", ErrInvalid, id)
	}
	if err != nil {
		m.mu.Unlock()
		return SnapshotInfo{}, err
	}
	s.taking = make(chan struct{})
	members := make([]*member, len(s.members))
	nodes := make([]string, len(s.members))
	for i, mb := range s.members {
		members[i], nodes[i] = &member{dev: mb.dev}, mb.dev.path()
	}
	// Recorded first: if the daemon dies before the thaw, the next one
	// thaws these devices' filesystems (Recover).
	m.freezing = append(m.freezing, nodes...)
	m.unlockSavingOrWarn()

	err = m.take(ctx, s, members)
	if err != nil {
		if rerr := m.release(members); rerr != nil {
			m.log.Error("undo failed take", "id", id, "err", rerr)
		}
	}

	m.mu.Lock()
	m.freezing = slices.DeleteFunc(m.freezing, func(n string) bool { return slices.Contains(nodes, n) })
	close(s.taking)
	s.taking = nil
	var info SnapshotInfo
	if err == nil {
		s.members, s.taken = members, true
		info = s.info()
	}
	m.unlockSavingOrWarn()
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("take snapshot %s: %w", id, err)
	}
	m.log.Info("snapshot taken", "id", id, "devices", len(members))
	return info, nil
}

// take gives each of members (copies of s's, owned by the take) its
// difference area over s's storage, switches them to COW and serves their
// images.
func (m *Manager) take(ctx context.Context, s *snapshot, members []*member) error {
	for _, mb := range members {
		area, err := cow.NewDiffArea(mb.dev.file, s.storage, m.params, m.log, cow.WithBufferBudget(m.buffers))
		if err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		mb.area = area
	}
	if err := m.switchToCOW(ctx, s.id, members); err != nil {
		return err
	}
	if err := m.serveImages(ctx, members); err != nil {
		return err
	}
	for _, mb := range members {
		if corrupted, errno := mb.area.Corrupted(); corrupted {
			return fmt.Errorf("%w: the difference area of %s failed: %w", ErrConflict, mb.dev.path(), errno)
		}
	}
	return nil
}

// switchToCOW freezes the members' filesystems, pauses their writes, gives
// every member its difference area at once, resumes and thaws.
func (m *Manager) switchToCOW(ctx context.Context, id string, members []*member) error {
	pctx, cancel := context.WithTimeout(ctx, m.takeTimeout)
	defer cancel()
	var thaws []func() error
	defer func() {
		for _, thaw := range thaws {
			if err := thaw(); err != nil {
				m.log.Error("thaw after take", "id", id, "err", err)
			}
		}
	}()
	for _, mb := range members {
		thaw, err := m.freeze(pctx, mb.dev.blk.DevNum())
		if err != nil {
			return fmt.Errorf("freeze the filesystems of %s: %w", mb.dev.path(), err)
		}
		thaws = append(thaws, thaw)
	}
	paused := members[:0:0]
	defer func() {
		for _, mb := range paused {
			mb.dev.gate.Resume()
		}
	}()
	for _, mb := range members {
		if err := mb.dev.gate.Pause(pctx); err != nil {
			return fmt.Errorf("pause writes to %s: %w", mb.dev.path(), err)
		}
		paused = append(paused, mb)
	}
	for _, mb := range members {
		mb.dev.orig.SetDiffArea(mb.area)
		mb.dev.track.Switch()
	}
	return nil
}

// serveImages serves an image device for every member over its area.
func (m *Manager) serveImages(ctx context.Context, members []*member) error {
	for _, mb := range members {
		logical, physical := mb.area.BlockSizes()
		cfg := geometryConfig(storage.Geometry{Size: mb.area.Size(), LogicalBlockSize: logical, PhysicalBlockSize: physical}, m.log)
		cfg.Owner = m.owner
		// Reads go straight from the original or the difference storage
		// into the request (zero copy on 7.x); the engine needs a write's
		// data (copied in from a bounded pool). The image moves its data
		// as its device does.
		cfg.IOMode, cfg.WriteData = mb.dev.blk.IOMode(), true
		cfg.Files = backingFiles(mb.area.Original())
		cfg.InlineMax = inlineMax(mb.area.Original())
		// Like blksnap's images (GENHD_FL_NO_PART), and because a
		// daemon killed during a take's partition scan hangs on 6.12.
		cfg.NoPartitionScan = true
		// The image outlives the request: it ends with Destroy or Close.
		img, err := m.server.Serve(context.WithoutCancel(ctx), cfg, newImageHandler(mb.area, mb.dev.track, m.log))
		if err != nil {
			return fmt.Errorf("image of %s: %w", mb.dev.path(), err)
		}
		mb.image = img
	}
	return nil
}

// freeze freezes the filesystems of dev within ctx's deadline. A freeze
// that does not finish in time (it writes back, and a device can hang) is
// abandoned: the take fails, and if the freeze completes later its
// filesystems are thawed at once.
func (m *Manager) freeze(ctx context.Context, dev uint64) (func() error, error) {
	type result struct {
		thaw func() error
		err  error
	}
	done := make(chan result, 1)
	go func() {
		thaw, err := m.host.Freeze(ctx, dev)
		done <- result{thaw, err}
	}()
	select {
	case r := <-done:
		return r.thaw, r.err
	case <-ctx.Done():
		go func() {
			if r := <-done; r.err == nil {
				if err := r.thaw(); err != nil {
					m.log.Error("thaw after an abandoned freeze", "err", err)
				}
			}
		}()
		return nil, fmt.Errorf("%w: the freeze did not finish in time: %w", ErrBusy, ctx.Err())
	}
}

// release undoes a take, fully or in part: it closes the difference
// areas first (requests waiting in them give up, and after the area's
// bound even those stuck in the difference storage are failed), switches
// the members off COW and stops the images. It waits for I/O, so it runs
// without Manager.mu, on members no one else changes: those of a failed
// take, or of a snapshot that left the manager.
func (m *Manager) release(members []*member) error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), m.destroyTimeout)
	defer cancel()
	for _, mb := range members {
		if mb.area != nil {
			errs = append(errs, mb.area.Close(ctx))
		}
	}
	for _, mb := range members {
		if mb.area == nil {
			continue
		}
		// A pause makes sure no write is between its COW and its write.
		pctx, cancel := context.WithTimeout(context.Background(), m.destroyTimeout)
		err := mb.dev.gate.Pause(pctx)
		cancel()
		mb.dev.orig.SetDiffArea(nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("pause writes to %s: %w", mb.dev.path(), err))
		} else {
			mb.dev.gate.Resume()
		}
	}
	for _, mb := range members {
		if mb.image != nil {
			errs = append(errs, mb.image.Close())
		}
	}
	return errors.Join(errs...)
}

// WaitEvent waits up to timeout for the snapshot's next event; it returns
// storage.ErrTimeout when none came.
func (m *Manager) WaitEvent(ctx context.Context, id string, timeout time.Duration) (storage.Event, error) {
	m.mu.Lock()
	if l, ok := m.lost[id]; ok {
		m.mu.Unlock()
		return l.event(), nil
	}
	s, err := m.snapshotLocked(id)
	m.mu.Unlock()
	if err != nil {
		return storage.Event{}, err
	}
	e, err := s.storage.Events().Wait(ctx, timeout)
	if errors.Is(err, storage.ErrEventQueueClosed) {
		return storage.Event{}, fmt.Errorf("%w: snapshot %s was destroyed", ErrNotFound, id)
	}
	if err != nil {
		return storage.Event{}, err
	}
	if e.Code == storage.EventCorrupted {
		m.mu.Lock()
		for _, mb := range s.members {
			if mb.dev.file.Name() == e.Device {
				e.Device = mb.dev.path()
			}
		}
		m.mu.Unlock()
	}
	return e, nil
}

// Destroy removes a snapshot's images and releases its storage (blksnap's
// snapshot_destroy). Without force it refuses while an image is mounted or
// open (found without the manager's lock); a take that runs is waited for,
// within ctx. The snapshot then leaves the manager; its teardown runs
// without the manager's lock (the members keep their closed areas and
// images for reports until they are free) and is waited for up to the
// destroy timeout: if the difference storage hangs, the areas are
// corrupted (their requests fail with EIO) and what still waits for the
// storage finishes in the background.
func (m *Manager) Destroy(ctx context.Context, id string, force bool) error {
	for {
		m.mu.Lock()
		if _, ok := m.lost[id]; ok {
			delete(m.lost, id)
			m.unlockSavingOrWarn()
			m.log.Info("lost snapshot forgotten", "id", id)
			return nil
		}
		s, err := m.snapshotLocked(id)
		if err != nil {
			m.mu.Unlock()
			return err
		}
		if running := s.taking; running != nil {
			m.mu.Unlock()
			select {
			case <-running:
				continue
			case <-ctx.Done():
				return fmt.Errorf("destroy snapshot %s: its take still runs: %w", id, ctx.Err())
			}
		}
		images := s.imagesLocked()
		m.mu.Unlock()
		if !force {
			if err := m.checkUnused(ctx, images...); err != nil {
				return fmt.Errorf("destroy snapshot %s: %w", id, err)
			}
		}
		m.mu.Lock()
		if m.snapshots[id] != s || s.taking != nil {
			m.mu.Unlock()
			continue // destroyed or being taken meanwhile: look again
		}
		delete(m.snapshots, id)
		m.unlockSavingOrWarn()
		err = m.teardown(s)
		m.log.Info("snapshot destroyed", "id", id, "err", err)
		return err
	}
}

// teardown releases a snapshot that left the manager, waiting at most the
// destroy timeout, then frees its members for other snapshots.
func (m *Manager) teardown(s *snapshot) error {
	s.end()
	done := make(chan error, 1)
	go func() {
		err := m.release(s.members)
		m.mu.Lock()
		for _, mb := range s.members {
			mb.dev.snap = nil
		}
		m.mu.Unlock()
		err = errors.Join(err, s.storage.Close())
		if s.created != nil {
			err = errors.Join(err, s.created.remove())
		}
		done <- err
	}()
	timer := time.NewTimer(m.destroyTimeout)
	defer timer.Stop()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("destroy snapshot %s: %w", s.id, err)
		}
		return nil
	case <-timer.C:
		m.log.Error("snapshot teardown still waits for I/O; it goes on in the background", "id", s.id, "after", m.destroyTimeout)
		return nil
	}
}

// DeviceState reports which snapshot holds a device and its state.
func (m *Manager) DeviceState(_ context.Context, ref string) (DeviceState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.deviceLocked(ref)
	if err != nil {
		return DeviceState{}, err
	}
	st := DeviceState{Device: d.path(), State: StateNone}
	if d.snap == nil {
		for _, l := range m.lost {
			if slices.Contains(l.devices, d.path()) {
				st.Snapshot, st.State, st.Errno = l.id, StateLost, ErrnoLost
			}
		}
		return st, nil
	}
	st.Snapshot, st.State = d.snap.id, d.snap.state()
	for _, mb := range d.snap.members {
		if mb.dev == d {
			mi := mb.info()
			st.Image, st.Errno = mi.Image, mi.Errno
			if mi.Errno != 0 {
				st.State = StateCorrupted
			}
		}
	}
	return st, nil
}

// state is the snapshot's state for reports.
func (s *snapshot) state() State {
	if !s.taken {
		return StateCreated
	}
	for _, mb := range s.members {
		if mb.area != nil {
			if corrupted, _ := mb.area.Corrupted(); corrupted {
				return StateCorrupted
			}
		}
	}
	return StateTaken
}

// event is what a waiter on a lost snapshot gets: its first member
// corrupted with ErrnoLost.
func (l *lostSnapshot) event() storage.Event {
	e := storage.Event{Time: time.Now(), Code: storage.EventCorrupted, Errno: ErrnoLost}
	if len(l.devices) > 0 {
		e.Device = l.devices[0]
	}
	return e
}

func (l *lostSnapshot) info() SnapshotInfo {
	out := SnapshotInfo{ID: l.id, State: StateLost, Members: []MemberInfo{}}
	for _, d := range l.devices {
		out.Members = append(out.Members, MemberInfo{Device: d, Errno: ErrnoLost})
	}
	return out
}

func (s *snapshot) info() SnapshotInfo {
	st := s.storage.Stats()
	out := SnapshotInfo{ID: s.id, State: s.state(), Members: []MemberInfo{},
		Storage: StorageInfo{
			Capacity: st.Capacity << storage.SectorShift,
			Used:     st.Filled << storage.SectorShift,
			Limit:    s.limit,
		}}
	for _, mb := range s.members {
		out.Members = append(out.Members, mb.info())
	}
	return out
}

// imagesLocked returns the images of s's members, none before the take.
func (s *snapshot) imagesLocked() []BlockDevice {
	var out []BlockDevice
	for _, mb := range s.members {
		if mb.image != nil {
			out = append(out, mb.image)
		}
	}
	return out
}

func (mb *member) info() MemberInfo {
	out := MemberInfo{Device: mb.dev.path()}
	if mb.image != nil {
		out.Image, out.ImageIOMode = mb.image.Path(), mb.image.IOMode().String()
	}
	if mb.area != nil {
		st := mb.area.Stats()
		out.ChunkSize = st.ChunkSize
		out.ChunksCopied = int64(st.Chunks - st.ChunksInState[cow.ChunkNew])
		out.KernelCopied = int64(st.KernelCopied)
		out.InMemory = int64(st.ChunksInState[cow.ChunkInMemory])
		if corrupted, errno := mb.area.Corrupted(); corrupted {
			out.Errno = errno
		}
	}
	return out
}
