package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
)

// A taken snapshot survives a planned restart (Leave, then Recover in the
// next daemon). Leave stops its images, pauses its members' writes for
// good (the requests waiting in the gates are sent again to the next
// daemon by the kernel), stores every chunk held in memory and records,
// in the state file, the layout of the difference storage and each
// member's copied chunks. The next daemon reopens the storage, rebuilds
// the difference areas and attaches them to the members before it serves
// the members again, so no write reaches a member without COW; then it
// serves new images. An unnamed file in a directory (the storage of
// `snapshot create --storage DIR`) is given a hidden name in that
// directory for the handover, .ublksnap-ID-N.diff, which the next daemon
// takes away again once it has the file open. A snapshot whose storage
// cannot outlive the process (a device that is not a file), that is not
// taken, or whose save fails is released and reported lost instead.

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

// saveSnapshotLocked stops s's images, pauses its members for good and
// returns the record of s. On failure the members are resumed and s is
// the caller's to release. The caller holds m.mu.
func (m *Manager) saveSnapshotLocked(s *snapshot) (snapshotEntry, error) {
	e := snapshotEntry{ID: s.id, Devices: s.memberPaths()}
	if s.created != nil {
		e.CreatedStorage, e.StorageDev, e.StorageIno = s.storageName, s.storageIdent.fsDev, s.storageIdent.ino
	}
	if !s.taken {
		return e, fmt.Errorf("snapshot %s is not taken", s.id)
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.destroyTimeout)
	defer cancel()
	var paused []*member
	fail := func(err error) (snapshotEntry, error) {
		for _, mb := range paused {
			mb.dev.gate.Resume()
		}
		if uerr := s.storage.Unname(); uerr != nil {
			m.log.Error("remove the names given to the unnamed storage files", "id", s.id, "err", uerr)
		}
		return e, fmt.Errorf("save snapshot %s: %w", s.id, err)
	}
	for _, mb := range s.members {
		if err := mb.dev.gate.Pause(ctx); err != nil {
			return fail(fmt.Errorf("pause writes to %s: %w", mb.dev.path(), err))
		}
		paused = append(paused, mb)
	}
	for _, mb := range s.members {
		if mb.image != nil {
			if err := mb.image.Close(); err != nil {
				return fail(fmt.Errorf("stop the image of %s: %w", mb.dev.path(), err))
			}
			mb.image = nil
		}
	}
	saved := &savedSnapshot{Limit: s.limit}
	for _, mb := range s.members {
		if err := mb.area.Drain(ctx); err != nil {
			return fail(fmt.Errorf("store the chunks of %s: %w", mb.dev.path(), err))
		}
		chunks, err := mb.area.Saved()
		if err != nil {
			return fail(err)
		}
		saved.Members = append(saved.Members, savedMember{UblkID: mb.dev.blk.ID(), Device: mb.dev.path(), ChunkShift: mb.area.ChunkShift(), Chunks: chunks})
	}
	if err := s.storage.NameUnnamed(func(i int) string { return fmt.Sprintf(".ublksnap-%s-%d.diff", s.id, i) }); err != nil {
		return fail(err)
	}
	layout, err := s.storage.Layout()
	if err != nil {
		return fail(err)
	}
	saved.Storage = layout
	for _, d := range layout.Devices {
		name, ok := s.storagePaths[d.Path]
		if dir, dirOK := s.storagePaths[filepath.Dir(d.Path)]; !ok && d.Unnamed && dirOK {
			// An unnamed file named for the handover: in the directory as
			// the user gave it.
			name, ok = filepath.Join(dir, filepath.Base(d.Path)), true
		}
		if !ok {
			name = d.Path
		}
		saved.StorageNames = append(saved.StorageNames, name)
	}
	e.Saved = saved
	return e, nil
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

// abandon detaches and closes the areas of a snapshot, and closes its
// storage, leaving its files as they are: for a snapshot that could not
// be brought back, or one saved for the next daemon.
func (m *Manager) abandon(s *snapshot) {
	s.end()
	ctx, cancel := context.WithTimeout(context.Background(), m.destroyTimeout)
	defer cancel()
	for _, mb := range s.members {
		mb.dev.orig.SetDiffArea(nil)
		mb.area.Close(ctx)
		if mb.image != nil {
			mb.image.Close()
		}
	}
	s.storage.Close()
	if s.created != nil {
		s.created.dir.Close()
	}
}

// reopenCreated is createFile's record of an existing file p.
func reopenCreated(p string) (*createdFile, error) {
	dir, err := os.OpenFile(filepath.Dir(p), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &createdFile{dir: dir, name: filepath.Base(p)}, nil
}
