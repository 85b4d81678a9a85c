package cbt

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/uuid"
)

// Point names a state of a map: a generation and a changes number. A
// backup records the point of the snapshot it copied.
type Point struct {
	Generation uuid.UUID
	Changes    uint8
}

// String formats p as GENERATION:NUMBER.
func (p Point) String() string { return p.Generation.String() + ":" + strconv.Itoa(int(p.Changes)) }

// ParsePoint parses GENERATION:NUMBER.
func ParsePoint(s string) (Point, error) {
	g, n, ok := strings.Cut(s, ":")
	if !ok {
		return Point{}, fmt.Errorf("%q: want GENERATION:NUMBER", s)
	}
	gen, err := uuid.Parse(g)
	if err != nil {
		return Point{}, fmt.Errorf("%q: generation: %v", s, err)
	}
	num, err := strconv.ParseUint(n, 10, 8)
	if err != nil {
		return Point{}, fmt.Errorf("%q: number: want 0 to 255", s)
	}
	return Point{Generation: gen, Changes: uint8(num)}, nil
}

// Extent is a run of bytes of a device: the byte-run type of all of
// ublksnap (changes, dirty marks, backups), also on the daemon's wire, as
// {"offset","length"}.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// Changed returns the byte extents, merged, of the blocks of readMap
// changed since the point since, for a map described by info. full is true
// when since is of another generation, or its number is newer than the
// map's: then every block is returned.
func Changed(readMap []byte, info Info, since Point) (ext []Extent, full bool) {
	full = since.Generation != info.Generation || since.Changes > info.Changes
	var cur *Extent
	for i, v := range readMap {
		if !full && v <= since.Changes {
			cur = nil
			continue
		}
		off := int64(i) * info.BlockSize
		n := min(info.BlockSize, info.Capacity-off)
		if cur != nil {
			cur.Length += n
			continue
		}
		ext = append(ext, Extent{Offset: off, Length: n})
		cur = &ext[len(ext)-1]
	}
	return ext, full
}

// ErrOtherGeneration reports a point that the map cannot answer for: of
// another generation, or newer than the map's last take.
var ErrOtherGeneration = errors.New("cbt: the point is not in this map's history")

// Run is a stretch of bytes that all changed, or all did not.
type Run struct {
	Length  int64
	Changed bool
}

// Runs describes the read map from byte off for about length bytes:
// consecutive runs of blocks changed or not since the point since, at most
// maxRuns of them. The first run starts at off; the last one ends at a
// block boundary, so it may reach past off+length (or stop short of it
// when maxRuns is reached).
func (m *Map) Runs(since Point, off, length int64, maxRuns int) ([]Run, error) {
	if off < 0 || length <= 0 || off >= m.capacity {
		return nil, fmt.Errorf("runs [%d+%d] of a %d-byte map: %w", off, length, m.capacity, ErrRange)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if since.Generation != m.generation || since.Changes > m.previous {
		return nil, fmt.Errorf("%w: %s, the map is at %s", ErrOtherGeneration, since, Point{m.generation, m.previous})
	}
	var runs []Run
	end := min(off+length, m.capacity)
	for pos := off; pos < end; {
		b := pos >> m.shift
		next := min((b+1)<<m.shift, m.capacity)
		changed := m.read[b] > since.Changes
		if n := len(runs); n > 0 && runs[n-1].Changed == changed {
			runs[n-1].Length += next - pos
		} else if n == maxRuns {
			break
		} else {
			runs = append(runs, Run{Length: next - pos, Changed: changed})
		}
		pos = next
	}
	return runs, nil
}
