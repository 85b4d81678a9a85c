package snapshot

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/internal/atomicfile"
	"github.com/ublksnap/ublksnap/storage"
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

// stateWriter writes the state file without Manager.mu: a state is
// encoded under Manager.mu and numbered, and written once the caller has
// unlocked. Writes are serialized, and one that a later encoding
// supersedes is skipped: the later one records its change too, since it
// was encoded after it under Manager.mu. Each write goes to a temporary
// file, synced, then renamed over the old one, so a crash leaves the old
// or the new record, never a torn one.
type stateWriter struct {
	path    string     // the state file, or ""; immutable
	encoded uint64     // number of the last state encoded; guarded by Manager.mu
	mu      sync.Mutex // serializes writes; never held with Manager.mu
	written uint64     // number of the last state written; guarded by mu
}

// pendingState is a state encoded under Manager.mu, to be written after.
type pendingState struct {
	w    *stateWriter
	path string // w.path when encoded
	seq  uint64 // its number in w.encoded's sequence
	data []byte // nil: nothing to write (no state file)
	err  error  // the encoding failed
}

// encodeStateLocked encodes the state of the devices now served and the
// snapshots now recorded. The caller holds m.mu and writes the result
// after unlocking it.
func (m *Manager) encodeStateLocked() pendingState {
	w := &m.state
	if w.path == "" {
		return pendingState{}
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
	w.encoded++
	data, err := json.MarshalIndent(st, "", "  ")
	return pendingState{w: w, path: w.path, seq: w.encoded, data: data, err: err}
}

// write writes p unless a later state was written already.
func (p pendingState) write() error {
	if p.err != nil {
		return fmt.Errorf("save state: %w", p.err)
	}
	if p.data == nil {
		return nil
	}
	p.w.mu.Lock()
	defer p.w.mu.Unlock()
	if p.w.written >= p.seq {
		return nil
	}
	if err := atomicfile.WriteFile(p.path, p.data, 0o600); err != nil {
		return fmt.Errorf("save state %s: %w", p.path, err)
	}
	p.w.written = p.seq
	return nil
}

// saveLocked writes the state with m.mu held, for the one caller that
// must undo its change when the write fails (Attach).
func (m *Manager) saveLocked() error { return m.encodeStateLocked().write() }

// unlockSaving unlocks m.mu and then writes the state encoded just
// before, so that no request waits for the file's sync.
func (m *Manager) unlockSaving() error {
	p := m.encodeStateLocked()
	m.mu.Unlock()
	return p.write()
}

// unlockSavingOrWarn is unlockSaving where a failure costs only the
// report of a lost snapshot after a crash.
func (m *Manager) unlockSavingOrWarn() {
	if err := m.unlockSaving(); err != nil {
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

// StatePathFor is where a daemon on socket keeps its state file.
func StatePathFor(socket string) string { return BesideSocket(socket, "state") }

// BesideSocket is where a daemon on socket keeps its file of kind (state,
// exports): the socket's path with KIND.json for its extension.
func BesideSocket(socket, kind string) string {
	return strings.TrimSuffix(socket, filepath.Ext(socket)) + "." + kind + ".json"
}

// savedSnapshot is what the state file keeps of a taken snapshot across a
// planned restart.
type savedSnapshot struct {
	Limit        int64          `json:"limit"`
	Storage      storage.Layout `json:"storage"`
	StorageNames []string       `json:"storage_names"` // the user's path of each Storage.Devices entry
	Members      []savedMember  `json:"members"`
}

// savedMember is one member's difference area.
type savedMember struct {
	UblkID     int              `json:"ublk_id"`
	Device     string           `json:"device"`
	ChunkShift uint             `json:"chunk_shift"`
	Chunks     []cow.SavedChunk `json:"chunks"`
}
