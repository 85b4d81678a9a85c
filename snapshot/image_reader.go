package snapshot

import (
	"context"
	"fmt"
	"io"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
)

// ImageReader reads the image of one device of a taken snapshot inside
// the daemon: the bytes the image device reads, without a trip through
// the kernel, and which of them changed since a change tracking point.
// Once the snapshot is destroyed (or the daemon leaves), Ended is closed
// and reads fail with cow.ErrClosed. It is safe for concurrent use.
type ImageReader struct {
	Snapshot string // the snapshot's UUID
	Device   string // the original device's node
	Name     string // the original device's name
	Size     int64  // bytes

	area  *cow.DiffArea   // immutable
	orig  *storage.File   // the original's backing; immutable
	track *cbt.Map        // the device's change tracking; immutable
	ended <-chan struct{} // the snapshot's ended
}

// OpenImages returns a reader for the image of every device of snapshot
// id, or only of device ref when it is not empty.
func (m *Manager) OpenImages(id, ref string) ([]*ImageReader, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.snapshotLocked(id)
	if err != nil {
		return nil, err
	}
	if !s.taken {
		return nil, fmt.Errorf("%w: snapshot %s is not taken: it has no images yet", ErrConflict, id)
	}
	var want *device
	if ref != "" {
		if want, err = m.deviceLocked(ref); err != nil {
			return nil, err
		}
	}
	var out []*ImageReader
	for _, mb := range s.members {
		if want != nil && mb.dev != want {
			continue
		}
		out = append(out, &ImageReader{Snapshot: s.id, Device: mb.dev.path(), Name: mb.dev.name, Size: mb.area.Size(),
			area: mb.area, orig: mb.dev.file, track: mb.dev.track, ended: s.ended})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: %s is not in snapshot %s", ErrNotFound, ref, id)
	}
	return out, nil
}

// ReadAt reads the image. Reads need not be sector-aligned.
func (r *ImageReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= r.Size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), r.Size-off)
	start, end := off&^(storage.SectorSize-1), (off+n+storage.SectorSize-1)&^(storage.SectorSize-1)
	var err error
	if start == off && end == off+n {
		err = r.area.ReadImage(context.Background(), p[:n], off, false)
	} else {
		buf := make([]byte, end-start)
		if err = r.area.ReadImage(context.Background(), buf, start, false); err == nil {
			copy(p, buf[off-start:])
		}
	}
	switch {
	case err != nil:
		return 0, err
	case n < int64(len(p)):
		return int(n), io.EOF
	}
	return int(n), nil
}

// Tracking returns the change tracking state of the image's device: a
// backup of this image records its point (Generation, Changes).
func (r *ImageReader) Tracking() cbt.Info { return r.track.Info() }

// Changed describes the image from byte off for about length bytes as
// runs of bytes changed or not since the point since (cbt.Map.Runs).
func (r *ImageReader) Changed(since cbt.Point, off, length int64, maxRuns int) ([]cbt.Run, error) {
	return r.track.Runs(since, off, length, maxRuns)
}

// Allocation describes the image from off for about length bytes (at
// most maxSpans runs) as runs known to read as zeros (Hole) or not. A
// byte is known to be zero when the original's backing has a hole there
// and its chunk was never copied: the hole was then already there at the
// take (a write copies the chunk before it changes the original), and the
// image keeps reading those zeros whatever happens to the original later.
func (r *ImageReader) Allocation(off, length int64, maxSpans int) ([]storage.Span, error) {
	spans, err := r.orig.Allocation(off, min(length, r.Size-off), maxSpans)
	if err != nil {
		return nil, err
	}
	var out []storage.Span
	add := func(n int64, hole bool) {
		if k := len(out); k > 0 && out[k-1].Hole == hole {
			out[k-1].Length += n
		} else {
			out = append(out, storage.Span{Length: n, Hole: hole})
		}
	}
	shift := r.area.ChunkShift()
	pos := off
	for _, s := range spans {
		if !s.Hole {
			add(s.Length, false)
			pos += s.Length
			continue
		}
		for end := pos + s.Length; pos < end; {
			next := min((pos>>shift+1)<<shift, end)
			add(next-pos, r.area.ImageReadsOriginal(uint64(pos>>shift)))
			pos = next
		}
	}
	return out, nil
}

// Ended is closed when the snapshot goes away.
func (r *ImageReader) Ended() <-chan struct{} { return r.ended }
