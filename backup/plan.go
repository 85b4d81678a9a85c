package backup

import (
	"errors"
	"fmt"

	"github.com/ublksnap/ublksnap/cbt"
)

// Plan is what one backup copies: the whole device, or the blocks changed
// since a previous backup of the same device and generation.
type Plan struct {
	Ranges   []cbt.Extent // what to copy, in order
	Previous *Manifest    // the backup this one is incremental to; nil for a full one
	Reason   string       // why the previous backup given could not be followed (the plan is then a full one)
}

// PlanFrom plans a backup of a device whose change tracking is readMap
// (one byte per block, at the snapshot's take) described by info. With no
// previous backup the plan is a full one; with one, an incremental one if
// the device, its tracking block and generation are the same and the
// previous take is older, else a full one with the reason.
func PlanFrom(prev *Manifest, readMap []byte, info cbt.Info) (Plan, error) {
	full := Plan{Ranges: []cbt.Extent{{Offset: 0, Length: info.Capacity}}}
	switch {
	case prev == nil:
		return full, nil
	case prev.DeviceSize != info.Capacity:
		full.Reason = fmt.Sprintf("the device has %d bytes, the previous backup %d", info.Capacity, prev.DeviceSize)
	case prev.BlockSize != info.BlockSize:
		full.Reason = fmt.Sprintf("the tracking block is %d bytes, in the previous backup %d", info.BlockSize, prev.BlockSize)
	case prev.Generation != info.Generation.String():
		full.Reason = "change tracking started a new generation since the previous backup"
	case prev.Changes >= info.Changes:
		full.Reason = fmt.Sprintf("the previous backup is of take %d, this snapshot of take %d", prev.Changes, info.Changes)
	}
	if full.Reason != "" {
		return full, nil
	}
	ext, all := cbt.Changed(readMap, info, cbt.Point{Generation: info.Generation, Changes: prev.Changes})
	if all {
		return Plan{}, errors.New("change tracking answered a full backup for the same generation")
	}
	return Plan{Previous: prev, Ranges: ext}, nil
}
