package cbt

import (
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

// Extent is a byte range of the device.
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
