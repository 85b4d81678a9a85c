package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/internal/atomicfile"
	"github.com/ublksnap/ublksnap/storage"
)

// Change tracking (package cbt) starts when a device is attached: every
// write, discard and write-zeroes to it marks its map, a take switches the
// maps of all members inside the pause that switches them to COW, and
// writes to an image mark both maps of its device.
//
// A map outlives the daemon only when nothing can have been missed: a
// planned restart (Leave) pauses every device's writes for good and then
// saves its map beside the state file; a detach saves the map of a regular
// file after the last write. The next daemon (Recover), or the next attach
// of the same file, loads it once and deletes it. The saved map carries
// the backing's size, mtime and ctime: if they differ, the file was
// written behind our back and a new generation starts. A block device
// changes no such stamp, so its map is kept across a restart but not
// across a detach. After a crash there is no saved map: a new generation.

// cbtParams returns the tracking block parameters of the daemon.
func (m *Manager) cbtParams() cbt.Params {
	return cbt.Params{MinShift: m.params.TrackingBlockMinimumShift, MaxShift: m.params.TrackingBlockMaximumShift,
		MaxCount: m.params.TrackingBlockMaximumCount}
}

// cbtPath is where the map of the backing id is saved, or "" when the
// daemon keeps no state.
func (m *Manager) cbtPath(id identity) string {
	if m.state.path == "" {
		return ""
	}
	return filepath.Join(filepath.Dir(m.state.path), "cbt", fmt.Sprintf("%x-%x-%x.map", id.fsDev, id.rdev, id.ino))
}

// backingStamp is what changes when a regular file is written: its size,
// mtime and ctime in nanoseconds, from the open backing (the path may be
// in a caller's view that is gone). A block device's stamp is all zero.
func backingStamp(f *storage.File) ([3]int64, error) {
	st, err := f.Stat()
	if err != nil {
		return [3]int64{}, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return [3]int64{}, nil
	}
	return [3]int64{st.Size, st.Mtim.Nano(), st.Ctim.Nano()}, nil
}

// saveCBT saves the map of d for a later daemon or attach. The caller
// makes sure no write reaches d any more (paused or stopped).
func (m *Manager) saveCBT(d *device) error {
	p := m.cbtPath(d.ident)
	if p == "" {
		return nil
	}
	b, err := d.track.MarshalBinary()
	if err != nil {
		return err
	}
	stamp, err := backingStamp(d.file)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	binary.Write(&buf, binary.LittleEndian, stamp)
	buf.Write(b)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(p, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("save the change tracking map of %s: %w", d.backing.name, err)
	}
	return nil
}

// loadCBT returns the saved map of the backing of d, deleting the saved
// copy, or a new map (a new generation) when there is none or it no
// longer describes the backing.
func (m *Manager) loadCBT(d *device) *cbt.Map {
	size := d.file.Geometry().Size
	p := m.cbtPath(d.ident)
	if p == "" {
		return cbt.New(size, m.cbtParams())
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return cbt.New(size, m.cbtParams())
	}
	os.Remove(p)
	tm, err := m.decodeCBT(b, d.file, size)
	if err != nil {
		m.log.Warn("change tracking starts a new generation", "backing", d.backing.name, "reason", err)
		return cbt.New(size, m.cbtParams())
	}
	m.log.Info("change tracking map reloaded", "backing", d.backing.name, "generation", tm.Info().Generation, "changes", tm.Info().Changes)
	return tm
}

// decodeCBT checks the stamp of a saved map against the open backing f
// and loads the map.
func (m *Manager) decodeCBT(b []byte, f *storage.File, size int64) (*cbt.Map, error) {
	var saved [3]int64
	if err := binary.Read(bytes.NewReader(b), binary.LittleEndian, &saved); err != nil {
		return nil, fmt.Errorf("%w: no stamp", cbt.ErrBadSave)
	}
	stamp, err := backingStamp(f)
	if err != nil {
		return nil, err
	}
	if stamp != saved {
		return nil, errors.New("the backing file changed while no daemon tracked it")
	}
	return cbt.Load(b[binary.Size(saved):], size, m.cbtParams())
}

// CBTInfo returns the change tracking state of a device.
func (m *Manager) CBTInfo(ref string) (cbt.Info, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.deviceLocked(ref)
	if err != nil {
		return cbt.Info{}, err
	}
	return d.track.Info(), nil
}

// CBTMap returns the read map of a device, one byte per block, and the
// state it belongs to.
func (m *Manager) CBTMap(ref string) ([]byte, cbt.Info, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.deviceLocked(ref)
	if err != nil {
		return nil, cbt.Info{}, err
	}
	rm, info := d.track.ReadMap()
	return rm, info, nil
}

// MarkDirty marks byte ranges of a device changed in both maps: the
// current backup and the next one copy them. Every range is checked
// before any is marked.
func (m *Manager) MarkDirty(ref string, ranges []cbt.Extent) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, err := m.deviceLocked(ref)
	if err != nil {
		return err
	}
	size := d.file.Geometry().Size
	for _, r := range ranges {
		if r.Offset < 0 || r.Length <= 0 || r.Offset >= size || r.Length > size-r.Offset {
			return fmt.Errorf("%w: range of %d bytes at %d is outside %s (%d bytes)", ErrInvalid, r.Length, r.Offset, d.path(), size)
		}
	}
	for _, r := range ranges {
		if err := d.track.MarkBoth(r.Offset, r.Length); err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	return nil
}
