package storage

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Span is a run of bytes that are all allocated, or all a hole (reading
// as zeros).
type Span struct {
	Length int64
	Hole   bool
}

// Allocation describes length bytes at off (cut at the end of the file)
// as runs of data and holes, as the filesystem reports them (SEEK_DATA and
// SEEK_HOLE), in at most maxSpans runs (the last may end early). A block
// device, or a filesystem that does not tell, is all data. The answer is
// a moment's: writes may fill holes right after.
func (d *File) Allocation(off, length int64, maxSpans int) ([]Span, error) {
	end := min(off+length, d.Geometry().Size)
	if off < 0 || off >= end {
		return nil, fmt.Errorf("allocation of %s [%d+%d]: outside the file: %w", d.Name(), off, length, unix.EINVAL)
	}
	if d.block {
		return []Span{{Length: end - off}}, nil
	}
	var spans []Span
	add := func(n int64, hole bool) bool {
		if k := len(spans); k > 0 && spans[k-1].Hole == hole {
			spans[k-1].Length += n
			return true
		}
		if len(spans) == maxSpans {
			return false
		}
		spans = append(spans, Span{Length: n, Hole: hole})
		return true
	}
	for pos := off; pos < end; {
		data, err := unix.Seek(d.fd, pos, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO): // no data after pos
			data = end
		case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP):
			return []Span{{Length: end - off}}, nil
		case err != nil:
			return nil, fmt.Errorf("allocation of %s at %d: %w", d.Name(), pos, err)
		}
		if data = min(data, end); data > pos {
			if !add(data-pos, true) {
				break
			}
			pos = data
			continue
		}
		hole, err := unix.Seek(d.fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("allocation of %s at %d: %w", d.Name(), pos, err)
		}
		hole = min(max(hole, pos+1), end)
		if !add(hole-pos, false) {
			break
		}
		pos = hole
	}
	return spans, nil
}
