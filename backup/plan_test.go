package backup

import (
	"fmt"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/ublksnap/ublksnap/cbt"
)

// PlanFrom: a full backup without a previous one or when the previous one
// cannot be followed (and why), else the blocks changed since its take.
func TestPlanFrom(t *testing.T) {
	gen := uuid.New()
	const block, size = 64 << 10, 1<<20 + 4096 // the last block is short
	info := cbt.Info{BlockSize: block, BlockCount: 17, Capacity: size, Generation: gen, Changes: 3}
	readMap := make([]byte, 17)
	readMap[1], readMap[2], readMap[5], readMap[16] = 3, 2, 1, 3 // changed in takes 3, 2, 1, 3
	prev := func(edit func(*Manifest)) *Manifest {
		m := &Manifest{Version: manifestVersion, DeviceSize: size, BlockSize: block, Generation: gen.String(), Changes: 1, Full: true}
		if edit != nil {
			edit(m)
		}
		return m
	}
	whole := fmt.Sprint([]cbt.Extent{{Offset: 0, Length: size}})
	for _, c := range []struct {
		name   string
		prev   *Manifest
		ranges string
		reason string // a part of it; "" for none
		incr   bool
	}{
		{"no previous backup", nil, whole, "", false},
		{"since take 1", prev(nil), fmt.Sprint([]cbt.Extent{{Offset: block, Length: 2 * block}, {Offset: 16 * block, Length: 4096}}), "", true},
		{"since take 2", prev(func(m *Manifest) { m.Changes = 2 }), fmt.Sprint([]cbt.Extent{{Offset: block, Length: block}, {Offset: 16 * block, Length: 4096}}), "", true},
		{"other size", prev(func(m *Manifest) { m.DeviceSize = 1 << 20 }), whole, "bytes", false},
		{"other block", prev(func(m *Manifest) { m.BlockSize = 2 * block }), whole, "tracking block", false},
		{"other generation", prev(func(m *Manifest) { m.Generation = uuid.NewString() }), whole, "new generation", false},
		{"same take", prev(func(m *Manifest) { m.Changes = 3 }), whole, "take 3", false},
	} {
		p, err := PlanFrom(c.prev, readMap, info)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if got := fmt.Sprint(p.Ranges); got != c.ranges {
			t.Errorf("%s: ranges %s, want %s", c.name, got, c.ranges)
		}
		if (c.reason == "") != (p.Reason == "") || !strings.Contains(p.Reason, c.reason) {
			t.Errorf("%s: reason %q, want one with %q", c.name, p.Reason, c.reason)
		}
		if (p.Previous != nil) != c.incr {
			t.Errorf("%s: previous %v, want an incremental backup: %v", c.name, p.Previous, c.incr)
		}
	}
}
