package cbt_test

import (
	"fmt"

	"github.com/ublksnap/ublksnap/cbt"
)

// Change tracking between two backups: each take (Switch) closes an
// interval; a backup keeps the point of its take, and the next one asks
// which blocks changed since that point.
func ExampleMap() {
	m := cbt.New(1<<20, cbt.Params{MinShift: 16, MaxShift: 16, MaxCount: 1 << 20}) // 64 KiB blocks

	first := m.Switch() // the take of the first backup, which copies everything
	since := cbt.Point{Generation: first.Generation, Changes: first.Changes}

	m.Mark(4096, 512)        // writes after it: block 0
	m.Mark(200<<10, 128<<10) // blocks 3 to 5

	m.Switch() // the take of the next backup
	readMap, info := m.ReadMap()
	changed, full := cbt.Changed(readMap, info, since)
	fmt.Println("full:", full)
	for _, e := range changed {
		fmt.Printf("copy %d bytes at %d\n", e.Length, e.Offset)
	}
	// Output:
	// full: false
	// copy 65536 bytes at 0
	// copy 196608 bytes at 196608
}
