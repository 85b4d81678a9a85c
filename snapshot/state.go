package snapshot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/internal/atomicfile"
	"github.com/ublksnap/ublksnap/ublk"
)

// The state file records what a successor daemon needs to serve the
// filtered devices again after this one dies: for each device its ublk id,
// backing and the backing's identity. It lives on tmpfs (/run) because
// ublk devices do not outlive a reboot either. Snapshots are not in it:
// their chunk maps live in memory, so a crash loses them (and a replayed
// write, USER_RECOVERY_REISSUE, has no saved chunk to overwrite).

// stateVersion is the format of the state file.
const stateVersion = 1

// ownerMagic marks the ublk devices of ublksnap: the high 32 bits of the
// owner tag stored in the kernel's ublksrv_flags ("USNP"); the low 32 are
// a hash of the state file's path, so daemons with different state files
// leave each other's devices alone.
const ownerMagic = 0x55534e50

// ownerTag is the tag of devices recorded in statePath.
func ownerTag(statePath string) uint64 {
	h := fnv.New32a()
	h.Write([]byte(statePath))
	return ownerMagic<<32 | uint64(h.Sum32())
}

// stateFile is the JSON document of the state file.
type stateFile struct {
	Version   int             `json:"version"`
	Devices   []deviceEntry   `json:"devices"`
	Snapshots []snapshotEntry `json:"snapshots,omitempty"`
	// Freezing lists the devices whose filesystems a take was freezing:
	// the next daemon thaws them.
	Freezing []string `json:"freezing,omitempty"`
	// Params are the daemon's blksnap parameters; a successor with other
	// ones says so (saved snapshots need the same chunk size).
	Params *cow.Params `json:"params,omitempty"`
}

// snapshotEntry records a snapshot, so that a successor can report it
// lost and release the storage file it created.
type snapshotEntry struct {
	ID      string   `json:"id"`
	Devices []string `json:"devices"` // member nodes
	Lost    bool     `json:"lost,omitempty"`
	// CreatedStorage is a storage file the manager created (as the user
	// named it), with its identity; removed once the snapshot is lost.
	CreatedStorage string `json:"created_storage,omitempty"`
	StorageDev     uint64 `json:"storage_dev,omitempty"`
	StorageIno     uint64 `json:"storage_ino,omitempty"`
	// Saved is set by a planned restart (Leave): the snapshot goes on in
	// the next daemon.
	Saved *savedSnapshot `json:"saved,omitempty"`
}

// lostSnapshot is a snapshot of an earlier daemon that died with it (its
// chunk maps were in memory). It is reported, with ErrnoLost, until it is
// destroyed.
type lostSnapshot struct {
	id      string   // immutable
	devices []string // member nodes; immutable
}

// ErrnoLost is the error code of the members of a lost snapshot, in
// DeviceState, SnapshotInfo and the corrupted event that WaitEvent gives.
const ErrnoLost = syscall.ENOTRECOVERABLE

// deviceEntry records one filtered device.
type deviceEntry struct {
	UblkID  int    `json:"ublk_id"` // N of /dev/ublkbN
	Name    string `json:"name"`
	Backing string `json:"backing"` // the path as the user gave it
	Size    int64  `json:"size"`    // bytes served
	Queues  int    `json:"queues"`  // as asked for at attach (the kernel's count rules on recovery)
	Depth   int    `json:"depth"`
	FsDev   uint64 `json:"fs_dev"` // identity of the backing at attach
	Rdev    uint64 `json:"rdev"`
	Ino     uint64 `json:"ino"`
}

// saveLocked writes the state file for the devices now served: to a
// temporary file, synced, then renamed over the old one, so a crash leaves
// the old or the new record, never a torn one. The caller holds m.mu.
func (m *Manager) saveLocked() error {
	if m.statePath == "" {
		return nil
	}
	st := stateFile{Version: stateVersion, Devices: []deviceEntry{}, Freezing: m.freezing, Params: &m.params}
	for _, d := range m.devices {
		st.Devices = append(st.Devices, deviceEntry{UblkID: d.blk.ID(), Name: d.name, Backing: d.backing.name,
			Size: d.file.Geometry().Size, Queues: d.queues, Depth: d.depth, FsDev: d.ident.fsDev, Rdev: d.ident.rdev, Ino: d.ident.ino})
	}
	for _, s := range m.snapshots {
		e := snapshotEntry{ID: s.id, Devices: s.memberPaths()}
		if s.created != nil {
			e.CreatedStorage, e.StorageDev, e.StorageIno = s.storageName, s.storageIdent.fsDev, s.storageIdent.ino
		}
		st.Snapshots = append(st.Snapshots, e)
	}
	for _, l := range m.lost {
		st.Snapshots = append(st.Snapshots, snapshotEntry{ID: l.id, Devices: l.devices, Lost: true})
	}
	st.Snapshots = append(st.Snapshots, m.leaving...)
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := atomicfile.WriteFile(m.statePath, data, 0o600); err != nil {
		return fmt.Errorf("save state %s: %w", m.statePath, err)
	}
	return nil
}

// saveOrWarnLocked saves the state where a failure costs only the report
// of a lost snapshot after a crash.
func (m *Manager) saveOrWarnLocked() {
	if err := m.saveLocked(); err != nil {
		m.log.Warn("snapshots are not recorded: a crash would not report them lost", "err", err)
	}
}

// loadState reads the state file; a missing one is an empty state.
func loadState(p string) (stateFile, error) {
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return stateFile{Version: stateVersion}, nil
	}
	if err != nil {
		return stateFile{}, fmt.Errorf("read state %s: %w", p, err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return stateFile{}, fmt.Errorf("%w: state file %s is damaged (%v); move it away to start without recovering", ErrInvalid, p, err)
	}
	if st.Version != stateVersion {
		return stateFile{}, fmt.Errorf("%w: state file %s has version %d, this daemon reads %d", ErrInvalid, p, st.Version, stateVersion)
	}
	return st, nil
}

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
func (m *Manager) Recover(ctx context.Context) (RecoveryReport, error) {
	rep := RecoveryReport{Took: map[string]time.Duration{}}
	if m.statePath == "" {
		return rep, nil
	}
	st, err := loadState(m.statePath)
	if err != nil {
		return rep, err
	}
	devs, err := m.server.Scan()
	if err != nil {
		return rep, fmt.Errorf("recover: %w", err)
	}
	if st.Params != nil && *st.Params != m.params {
		m.log.Warn("recover: the blksnap parameters differ from the earlier daemon's; saved snapshots need the same chunk size", "earlier", *st.Params, "now", m.params)
	}
	recorded := map[int]deviceEntry{}
	for _, e := range st.Devices {
		recorded[e.UblkID] = e
	}
	// First open every recorded backing, so that the saved snapshots'
	// areas are attached before their members serve a single write.
	type pending struct {
		e    deviceEntry
		live bool // the kernel shows it live: maybe another process serves it
		d    *device
	}
	var opened []*pending
	members := map[int]*device{}
	fail := func(e deviceEntry, err error) {
		m.log.Error("recover: could not serve the device again; deleting it", "ublk", e.UblkID, "name", e.Name, "backing", e.Backing, "err", err)
		m.remove(e.UblkID)
		rep.Failed = append(rep.Failed, RecoveryFailure{e.UblkID, e.Name, e.Backing, err})
	}
	for _, info := range devs {
		if info.Owner != m.owner {
			continue
		}
		e, ok := recorded[info.ID]
		if !ok {
			if info.State == ublk.StateLive && processAlive(info.ServerPID) {
				continue // being served; not ours to judge
			}
			m.log.Warn("recover: deleting a stale device of ours", "ublk", info.ID, "state", info.State)
			m.remove(info.ID)
			rep.Removed = append(rep.Removed, info.ID)
			continue
		}
		delete(recorded, info.ID)
		d, err := m.openRecorded(ctx, e)
		if err != nil {
			fail(e, err)
			continue
		}
		opened = append(opened, &pending{e: e, live: info.State == ublk.StateLive, d: d})
		members[e.UblkID] = d
	}
	type restoredSnapshot struct {
		s *snapshot
		e snapshotEntry
	}
	var restored []restoredSnapshot
	for _, e := range st.Snapshots {
		if e.Saved != nil && !e.Lost {
			s, err := m.restoreSnapshot(e, members)
			if err == nil {
				restored = append(restored, restoredSnapshot{s, e})
				continue
			}
			m.log.Error("recover: the saved snapshot cannot go on", "id", e.ID, "err", err)
		}
		m.loseSnapshot(e)
	}
	served := map[*device]bool{}
	for _, p := range opened {
		start := time.Now()
		// The mode asked here is moot: the device keeps the one it was
		// created in.
		cfg := m.deviceConfig(p.d.file, ublk.IOModeAuto, true)
		blk, err := m.server.Recover(context.WithoutCancel(ctx), p.e.UblkID, cfg, newOriginalHandler(p.d.orig, p.d.gate, p.d.track, m.log))
		switch {
		case errors.Is(err, ublk.ErrNotRecoverable) && p.live:
			m.log.Error("recover: device is live, served by another process; left alone", "ublk", p.e.UblkID, "name", p.e.Name, "err", err)
			rep.Left = append(rep.Left, RecoveryFailure{p.e.UblkID, p.e.Name, p.e.Backing, err})
			p.d.file.Close()
		case err != nil:
			fail(p.e, err)
			p.d.file.Close()
		default:
			p.d.blk = blk
			served[p.d] = true
			m.mu.Lock()
			m.devices[p.d.path()] = p.d
			m.mu.Unlock()
			rep.Took[p.d.path()] = time.Since(start)
			m.log.Info("recovered", "device", p.d.path(), "backing", p.e.Backing, "took", rep.Took[p.d.path()])
			rep.Recovered = append(rep.Recovered, p.d.info())
		}
	}
	for _, r := range restored {
		if err := m.resumeSnapshot(ctx, r.s, served); err != nil {
			m.log.Error("recover: the saved snapshot cannot go on", "id", r.s.id, "err", err)
			m.abandon(r.s)
			m.loseSnapshot(r.e)
		}
	}
	m.thawLeftFrozen(ctx, st.Freezing)
	for _, e := range recorded {
		err := errors.New("no such ublk device any more")
		m.log.Error("recover: recorded device is gone", "ublk", e.UblkID, "name", e.Name)
		rep.Failed = append(rep.Failed, RecoveryFailure{e.UblkID, e.Name, e.Backing, err})
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unrecovered = append(slices.Clone(rep.Failed), rep.Left...)
	return rep, m.saveLocked()
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
		if err := e.Saved.Storage.RemoveUnnamed(); err != nil {
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
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.serveImages(ctx, s); err != nil {
		return err
	}
	for _, mb := range s.members {
		mb.dev.snap = s
	}
	m.snapshots[s.id] = s
	m.log.Info("snapshot resumed from the earlier daemon", "id", s.id, "images", len(s.members))
	return nil
}

// StatePathFor is where a daemon on socket keeps its state file.
func StatePathFor(socket string) string {
	ext := filepath.Ext(socket)
	return socket[:len(socket)-len(ext)] + ".state.json"
}
