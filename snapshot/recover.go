package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// This file is the restart's second half: Recover, run by the next daemon
// before its first request (the first half, Leave, is in leave.go;
// the state file's format in state.go).

// RecoveryReport says what Recover did with each device it found.
type RecoveryReport struct {
	Recovered []DeviceInfo             // served again, same node
	Took      map[string]time.Duration // how long each recovery took, by node
	Failed    []RecoveryFailure        // recorded but not served again: deleted
	Left      []RecoveryFailure        // recorded but live, served by another process: left alone
	Removed   []int                    // ublk ids of ours no record names (images, stale devices): deleted
}

// RecoveryFailure is a recorded device that was not served again.
type RecoveryFailure struct {
	UblkID  int
	Name    string
	Backing string
	Err     error
}

// Recover serves again, after a crash or restart of the daemon, the
// filtered devices that the state file records: each keeps its
// /dev/ublkbN and its users see only a pause. A recorded device whose
// backing cannot be opened, is no longer the same file, or that the kernel
// refuses to recover is deleted (one attempt, never left half-alive); ublk
// devices of ours that no record names (the images of a crashed daemon,
// stale devices) are deleted; other ublk devices are left alone. It must
// run before the first request. A damaged state file is an error and
// nothing is touched.
//
// It runs in phases, in this order so that no member of a saved snapshot
// serves a single write without its difference area:
//
//  1. openBackings: the recorded devices the kernel still has get their
//     backings opened and checked; the others are deleted.
//  2. restoreSnapshots: the saved snapshots get their storage and areas
//     back, attached to their members; the others are reported lost.
//  3. serveDevices: the kernel hands each device over to this daemon.
//  4. resumeSnapshots: the restored snapshots whose members are all
//     served again serve their images.
//  5. the filesystems a take left frozen are thawed, and the devices the
//     kernel no longer has are reported.
func (m *Manager) Recover(ctx context.Context) (RecoveryReport, error) {
	r := &recovery{m: m, rep: RecoveryReport{Took: map[string]time.Duration{}}, members: map[int]*device{}}
	if m.state.path == "" {
		return r.rep, nil
	}
	st, err := loadState(m.state.path)
	if err != nil {
		return r.rep, err
	}
	devs, err := m.server.Scan()
	if err != nil {
		return r.rep, fmt.Errorf("recover: %w", err)
	}
	if st.Params != nil && *st.Params != m.params {
		m.log.Warn("recover: the blksnap parameters differ from the earlier daemon's; saved snapshots need the same chunk size", "earlier", *st.Params, "now", m.params)
	}
	r.openBackings(ctx, st.Devices, devs)
	r.restoreSnapshots(st.Snapshots)
	served := r.serveDevices(ctx)
	r.resumeSnapshots(ctx, served)
	m.thawLeftFrozen(ctx, st.Freezing)
	for _, e := range r.recorded {
		err := errors.New("no such ublk device any more")
		m.log.Error("recover: recorded device is gone", "ublk", e.UblkID, "name", e.Name)
		r.rep.Failed = append(r.rep.Failed, RecoveryFailure{e.UblkID, e.Name, e.Backing, err})
	}
	m.mu.Lock()
	m.unrecovered = append(slices.Clone(r.rep.Failed), r.rep.Left...)
	return r.rep, m.unlockSaving()
}

// recovery is one run of Recover; it is owned by that call.
type recovery struct {
	m        *Manager
	rep      RecoveryReport
	recorded map[int]deviceEntry // devices of the state file the kernel has not shown (yet)
	opened   []*pendingDevice    // recorded devices the kernel has, their backings open
	members  map[int]*device     // the devices of opened by ublk id, for the saved snapshots
	restored []restoredSnapshot  // saved snapshots rebuilt over their members
}

// pendingDevice is a recorded device whose backing is open, not served yet.
type pendingDevice struct {
	e    deviceEntry
	live bool // the kernel shows it live: maybe another process serves it
	d    *device
}

// restoredSnapshot is a saved snapshot rebuilt by restoreSnapshot.
type restoredSnapshot struct {
	s *snapshot
	e snapshotEntry
}

// fail deletes a recorded device that cannot be served again.
func (r *recovery) fail(e deviceEntry, err error) {
	r.m.log.Error("recover: could not serve the device again; deleting it", "ublk", e.UblkID, "name", e.Name, "backing", e.Backing, "err", err)
	r.m.remove(e.UblkID)
	r.rep.Failed = append(r.rep.Failed, RecoveryFailure{e.UblkID, e.Name, e.Backing, err})
}

// openBackings is phase 1: it opens the backing of every recorded device
// the kernel still has (devs), and deletes the stale devices of ours that
// no record names.
func (r *recovery) openBackings(ctx context.Context, entries []deviceEntry, devs []ublk.Info) {
	m := r.m
	r.recorded = map[int]deviceEntry{}
	for _, e := range entries {
		r.recorded[e.UblkID] = e
	}
	for _, info := range devs {
		if info.Owner != m.owner {
			continue
		}
		e, ok := r.recorded[info.ID]
		if !ok {
			if info.State == ublk.StateLive && processAlive(info.ServerPID) {
				continue // being served; not ours to judge
			}
			m.log.Warn("recover: deleting a stale device of ours", "ublk", info.ID, "state", info.State)
			m.remove(info.ID)
			r.rep.Removed = append(r.rep.Removed, info.ID)
			continue
		}
		delete(r.recorded, info.ID)
		d, err := m.openRecorded(ctx, e)
		if err != nil {
			r.fail(e, err)
			continue
		}
		r.opened = append(r.opened, &pendingDevice{e: e, live: info.State == ublk.StateLive, d: d})
		r.members[e.UblkID] = d
	}
}

// restoreSnapshots is phase 2: the saved snapshots come back over their
// members; the others, and those that cannot, are reported lost.
func (r *recovery) restoreSnapshots(entries []snapshotEntry) {
	for _, e := range entries {
		if e.Saved != nil && !e.Lost {
			s, err := r.m.restoreSnapshot(e, r.members)
			if err == nil {
				r.restored = append(r.restored, restoredSnapshot{s, e})
				continue
			}
			r.m.log.Error("recover: the saved snapshot cannot go on", "id", e.ID, "err", err)
		}
		r.m.loseSnapshot(e)
	}
}

// serveDevices is phase 3: the kernel hands each opened device over to
// this daemon. It returns the devices served again.
func (r *recovery) serveDevices(ctx context.Context) map[*device]bool {
	m := r.m
	served := map[*device]bool{}
	for _, p := range r.opened {
		start := time.Now()
		// The mode asked here is moot: the device keeps the one it was
		// created in.
		cfg := m.deviceConfig(p.d.file, ublk.IOModeAuto, true)
		blk, err := m.server.Recover(context.WithoutCancel(ctx), p.e.UblkID, cfg, newOriginalHandler(p.d.orig, p.d.gate, p.d.track, m.log))
		switch {
		case errors.Is(err, ublk.ErrNotRecoverable) && p.live:
			m.log.Error("recover: device is live, served by another process; left alone", "ublk", p.e.UblkID, "name", p.e.Name, "err", err)
			r.rep.Left = append(r.rep.Left, RecoveryFailure{p.e.UblkID, p.e.Name, p.e.Backing, err})
			p.d.file.Close()
		case err != nil:
			r.fail(p.e, err)
			p.d.file.Close()
		default:
			p.d.blk = blk
			served[p.d] = true
			m.mu.Lock()
			m.devices[p.d.path()] = p.d
			m.mu.Unlock()
			r.rep.Took[p.d.path()] = time.Since(start)
			m.log.Info("recovered", "device", p.d.path(), "backing", p.e.Backing, "took", r.rep.Took[p.d.path()])
			r.rep.Recovered = append(r.rep.Recovered, p.d.info())
		}
	}
	return served
}

// resumeSnapshots is phase 4: each restored snapshot whose members are
// all served again serves its images; the others are reported lost.
func (r *recovery) resumeSnapshots(ctx context.Context, served map[*device]bool) {
	for _, rs := range r.restored {
		if err := r.m.resumeSnapshot(ctx, rs.s, served); err != nil {
			r.m.log.Error("recover: the saved snapshot cannot go on", "id", rs.s.id, "err", err)
			r.m.abandon(rs.s)
			r.m.loseSnapshot(rs.e)
		}
	}
}

// thawLeftFrozen thaws the filesystems of the recovered devices that a
// take of the earlier daemon was freezing when it died.
func (m *Manager) thawLeftFrozen(ctx context.Context, nodes []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, n := range nodes {
		d, ok := m.devices[n]
		if !ok {
			continue
		}
		if err := m.host.Thaw(ctx, d.blk.DevNum()); err != nil {
			m.log.Error("thaw the filesystems a take left frozen", "device", n, "err", err)
		} else {
			m.log.Warn("thawed the filesystems of a take the earlier daemon did not finish", "device", n)
		}
	}
}

// loseSnapshot reports a snapshot of an earlier daemon lost and removes
// the storage file it had created, if that is still the same file.
func (m *Manager) loseSnapshot(e snapshotEntry) {
	if !e.Lost {
		m.log.Error("snapshot lost: the daemon that held it ended without saving it", "id", e.ID, "devices", e.Devices)
	}
	if e.Saved != nil {
		if err := e.Saved.Storage.RemoveUnnamed(e.Saved.StorageNames); err != nil {
			m.log.Error("remove the names given to the unnamed storage files of a lost snapshot", "id", e.ID, "err", err)
		}
	}
	if e.CreatedStorage != "" {
		id, err := identify(e.CreatedStorage)
		switch {
		case err == nil && id.exists && id.fsDev == e.StorageDev && id.ino == e.StorageIno:
			if err := os.Remove(e.CreatedStorage); err != nil {
				m.log.Error("remove the difference storage of a lost snapshot", "id", e.ID, "file", e.CreatedStorage, "err", err)
			}
		case err == nil && id.exists:
			m.log.Warn("the difference storage of a lost snapshot was replaced; left alone", "id", e.ID, "file", e.CreatedStorage)
		}
	}
	m.mu.Lock()
	m.lost[e.ID] = &lostSnapshot{id: e.ID, devices: e.Devices}
	m.mu.Unlock()
}

// processAlive reports whether process pid exists.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// remove deletes ublk device id; one that is already gone is fine.
func (m *Manager) remove(id int) {
	if err := m.server.Remove(id); err != nil && !errors.Is(err, syscall.ENODEV) && !errors.Is(err, syscall.ENOENT) {
		m.log.Error("recover: delete device", "ublk", id, "err", err)
	}
}

// openRecorded opens the recorded backing of a device and checks that it
// is the same file, of the same size; the device is not served yet.
func (m *Manager) openRecorded(ctx context.Context, e deviceEntry) (*device, error) {
	backing, id, err := locate(ctx, "backing", e.Backing, false)
	if err != nil {
		return nil, err
	}
	if !id.sameFile(identity{fsDev: e.FsDev, rdev: e.Rdev, ino: e.Ino, exists: true}) {
		return nil, fmt.Errorf("%w: %s is no longer the file that was attached", ErrConflict, e.Backing)
	}
	file, err := m.openBacking(backing)
	if err != nil {
		return nil, err
	}
	if size := file.Geometry().Size; size != e.Size {
		file.Close()
		return nil, fmt.Errorf("%w: %s now has %d bytes, the device %d", ErrConflict, e.Backing, size, e.Size)
	}
	d := &device{name: e.Name, backing: backing, ident: id, file: file, orig: cow.NewOriginal(file), gate: newGate(),
		queues: e.Queues, depth: e.Depth}
	d.track = m.loadCBT(d)
	return d, nil
}

// resumeSnapshot puts a restored snapshot back in the manager and serves
// its images, once all its members are served again. On failure the
// caller abandons it.
func (m *Manager) resumeSnapshot(ctx context.Context, s *snapshot, served map[*device]bool) error {
	for _, mb := range s.members {
		if !served[mb.dev] {
			return fmt.Errorf("member %s is not served again", mb.dev.backing.name)
		}
	}
	// s is not in the manager yet: its images are served without the lock.
	if err := m.serveImages(ctx, s.members); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, mb := range s.members {
		mb.dev.snap = s
	}
	m.snapshots[s.id] = s
	m.log.Info("snapshot resumed from the earlier daemon", "id", s.id, "images", len(s.members))
	return nil
}

// restoreSnapshot rebuilds a saved snapshot over members, the devices the
// next daemon is about to serve again (by ublk id), and attaches its areas to
// them. Images are served later (serveImages). Nothing is left attached
// when it fails.
func (m *Manager) restoreSnapshot(e snapshotEntry, members map[int]*device) (*snapshot, error) {
	sv := e.Saved
	names := sv.StorageNames
	ds, err := storage.Restore(sv.Storage, names, storage.Options{MinimumSectors: m.params.DiffStorageMinimum, Logger: m.log})
	if err != nil {
		return nil, err
	}
	s := newSnapshot(e.ID, map[string]string{})
	s.storage, s.storageName, s.limit, s.taken = ds, e.CreatedStorage, sv.Limit, true
	for _, n := range names {
		s.storagePaths[n] = n // the restored storage opened the user's paths
	}
	if len(names) > 0 {
		if id, err := identify(names[0]); err == nil {
			s.storageIdent = id
		}
	}
	if e.CreatedStorage != "" {
		if s.created, err = reopenCreated(e.CreatedStorage); err != nil {
			m.log.Warn("the restored snapshot's storage file will not be removed at destroy", "file", e.CreatedStorage, "err", err)
		}
	}
	for _, sm := range sv.Members {
		d, ok := members[sm.UblkID]
		if !ok {
			m.abandon(s)
			return nil, fmt.Errorf("member %s is not served again", sm.Device)
		}
		area, err := cow.RestoreDiffArea(d.file, ds, m.params, m.log, sm.ChunkShift, sm.Chunks, cow.WithBufferBudget(m.buffers))
		if err != nil {
			m.abandon(s)
			return nil, err
		}
		d.orig.SetDiffArea(area)
		s.members = append(s.members, &member{dev: d, area: area})
	}
	return s, nil
}

// reopenCreated is createFile's record of an existing file p.
func reopenCreated(p string) (*createdFile, error) {
	dir, err := os.OpenFile(filepath.Dir(p), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &createdFile{dir: dir, name: filepath.Base(p)}, nil
}
