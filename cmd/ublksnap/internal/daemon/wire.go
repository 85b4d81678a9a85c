package daemon

import (
	"fmt"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/storage"
)

// This file turns package snapshot's types into the api package's.

func deviceToWire(d snapshot.DeviceInfo) api.Device {
	return api.Device{Name: d.Name, Path: d.Path, Backing: d.Backing, Size: uint64(d.Size), Snapshot: d.Snapshot,
		IOMode: d.IOMode, DirectIO: d.DirectIO}
}

func snapshotToWire(s snapshot.SnapshotInfo, err error) (api.Snapshot, error) {
	out := api.Snapshot{ID: s.ID, State: string(s.State), Devices: []api.SnapshotMember{},
		Storage: api.StorageInfo{Capacity: uint64(s.Storage.Capacity), Used: uint64(s.Storage.Used), Limit: uint64(s.Storage.Limit)}}
	for _, m := range s.Members {
		out.Devices = append(out.Devices, api.SnapshotMember{Device: m.Device, Image: m.Image, ImageIOMode: m.ImageIOMode,
			ChunkSize: uint64(m.ChunkSize), ChunksCopied: uint64(m.ChunksCopied),
			ChunksCopiedInKernel: uint64(m.KernelCopied), ChunksInMemory: uint64(m.InMemory), ErrorCode: -int(m.Errno)})
	}
	return out, err
}

func statusToWire(st snapshot.Status, version string) api.Status {
	out := api.Status{Version: version, Devices: []api.Device{}, Snapshots: []api.Snapshot{}}
	for _, d := range st.Devices {
		out.Devices = append(out.Devices, deviceToWire(d))
	}
	for _, s := range st.Snapshots {
		ws, _ := snapshotToWire(s, nil)
		out.Snapshots = append(out.Snapshots, ws)
	}
	for _, f := range st.Unrecovered {
		out.Unrecovered = append(out.Unrecovered, api.Unrecovered{Device: fmt.Sprintf("/dev/ublkb%d", f.UblkID),
			Name: f.Name, Backing: f.Backing, Error: f.Err.Error()})
	}
	for _, d := range st.Declared {
		w := api.Declared{Source: d.Source, Name: d.Options.Name, Backing: d.Options.Backing, Device: d.Device}
		if d.Err != nil {
			w.Error = d.Err.Error()
		}
		out.Declared = append(out.Declared, w)
	}
	return out
}

func eventToWire(e storage.Event) api.Event {
	out := api.Event{Code: e.Code.String(), Time: e.Time, RequestedSectors: uint64(e.RequestedSectors)}
	if e.Code == storage.EventCorrupted {
		out.Device, out.Errno, out.Error = e.Device, int(e.Errno), e.Errno.Error()
	}
	return out
}

func cbtInfoToWire(device string, i cbt.Info) api.CBTInfo {
	return api.CBTInfo{Device: device, BlockSize: i.BlockSize, BlockCount: i.BlockCount, Capacity: i.Capacity,
		Generation: i.Generation.String(), Changes: i.Changes}
}

func exportToWire(e export.Info) api.Export {
	out := api.Export{Listen: e.Listen, Address: e.Address, Snapshot: e.Snapshot, Exports: []api.ExportMember{}}
	for _, m := range e.Members {
		out.Exports = append(out.Exports, api.ExportMember{Name: m.Name, Device: m.Device, Size: uint64(m.Size), Bitmap: m.Bitmap})
	}
	return out
}
