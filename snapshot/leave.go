package snapshot

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sync"
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

// Leave ends the manager for a successor daemon (a planned restart): taken
// snapshots are saved for it (saveSnapshotLocked), the others released and
// recorded lost, the backings flushed and the state saved; the filtered
// devices are not stopped. The caller then exits: the kernel holds their I/O until
// the next daemon's Recover serves them again.
func (m *Manager) Leave() error {
	m.lockNoTake()
	var drop, saved []*snapshot
	for _, s := range m.removeSnapshotsLocked() {
		e, err := m.saveSnapshotLocked(s)
		if err == nil {
			m.leaving = append(m.leaving, e)
			saved = append(saved, s)
			m.log.Info("snapshot saved for the next daemon", "id", s.id)
			continue
		}
		m.log.Warn("snapshot released for the restart; it will be reported lost", "id", s.id, "err", err)
		m.lost[s.id] = &lostSnapshot{id: s.id, devices: s.memberPaths()}
		drop = append(drop, s)
	}
	errs := []error{m.unlockSaving()}
	for _, s := range drop {
		errs = append(errs, m.teardown(s))
	}
	// The saved snapshots' files stay as they are for the next daemon;
	// their members' writes wait in the paused gates until then.
	for _, s := range saved {
		m.abandon(s)
	}
	// Every device at once: each pause waits for that device's writes in
	// flight, and the restart's pause is the longest of them, not the sum.
	m.mu.Lock()
	defer m.mu.Unlock()
	devs := slices.Collect(maps.Values(m.devices))
	flushed := make([]error, len(devs))
	var wg sync.WaitGroup
	for i, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.orig.Flush(); err != nil {
				flushed[i] = fmt.Errorf("flush %s: %w", d.path(), err)
			}
			m.leaveCBT(d)
		}()
	}
	wg.Wait()
	return errors.Join(append(errs, flushed...)...)
}

// leaveCBT pauses the changes to d for good (the next daemon gets them
// again) and saves its change tracking map, which then misses nothing.
// A map that cannot be saved whole is not saved: the next daemon starts a
// new generation.
func (m *Manager) leaveCBT(d *device) {
	ctx, cancel := context.WithTimeout(context.Background(), m.destroyTimeout)
	defer cancel()
	err := d.gate.Pause(ctx)
	if err == nil {
		err = m.saveCBT(d)
	}
	if err != nil {
		m.log.Warn("change tracking of the device will start a new generation", "device", d.path(), "err", err)
	}
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
