package cow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"syscall"

	"github.com/ublksnap/ublksnap/storage"
)

// A DiffArea can outlive its process: Drain stores every chunk held in
// memory, Saved lists the copied chunks with their places in the
// difference storage, and RestoreDiffArea builds the same area in a
// successor process over the storage restored from its storage.Layout.
// Chunks that were never copied need nothing: the original still holds
// their snapshot data.

// ErrNotDrained is returned by Saved while chunks are held in memory.
var ErrNotDrained = errors.New("cow: chunks are still held in memory")

// SavedChunk is a copied chunk: its number and its region, Sectors long at
// Sector of the difference storage's device Dev (storage.Layout.Devices).
type SavedChunk struct {
	Number  uint64 `json:"n"`
	Dev     int    `json:"d"`
	Sector  int64  `json:"s"`
	Sectors int64  `json:"c"`
}

// Drain stores every chunk held in memory and waits until the store
// worker is idle. The caller makes sure that no request enters the area
// meanwhile (writes to the original paused, the image stopped).
func (da *DiffArea) Drain(ctx context.Context) error {
	da.storeMu.Lock()
	da.draining = true
	da.kickLocked()
	da.storeMu.Unlock()
	return waitUntil(ctx, &da.storeMu, &da.storeIdle, func() bool { return len(da.storeQueue) == 0 && da.storeBusy == 0 })
}

// ChunkShift is log2 of the chunk size in bytes.
func (da *DiffArea) ChunkShift() uint { return da.chunkShift }

// Saved lists the copied chunks once Drain has stored them all. It fails
// for a corrupted area and with ErrNotDrained while a chunk is in memory.
func (da *DiffArea) Saved() ([]SavedChunk, error) {
	if corrupted, errno := da.Corrupted(); corrupted {
		return nil, fmt.Errorf("save difference area of %s: corrupted: %w", da.name, errno)
	}
	out := []SavedChunk{}
	var err error
	da.chunks.each(func(c *Chunk) bool {
		nr := c.number
		switch c.State() {
		case ChunkNew:
			return true
		case ChunkStored:
		default:
			err = fmt.Errorf("save difference area of %s: chunk #%d is %v: %w", da.name, nr, c.State(), ErrNotDrained)
			return false
		}
		r := c.region
		dev := da.diffStorage.DeviceIndex(r.Dev)
		if dev < 0 {
			err = fmt.Errorf("save difference area of %s: chunk #%d is on a device the storage does not list: %w", da.name, nr, syscall.EFAULT)
			return false
		}
		out = append(out, SavedChunk{Number: nr, Dev: dev, Sector: r.Sector, Sectors: r.Count})
		return true
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// RestoreDiffArea is NewDiffArea (with its Options) with the copied
// chunks of a saved area: each is Stored at its region of ds. The chunk
// size must come out as it was (shift): same device geometry, same
// parameters.
func RestoreDiffArea(orig storage.Device, ds *storage.DiffStorage, params Params, log *slog.Logger, shift uint, chunks []SavedChunk, opts ...Option) (*DiffArea, error) {
	da, err := NewDiffArea(orig, ds, params, log, opts...)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*DiffArea, error) {
		da.cancel()
		da.free() // leaves the budget; no request ever entered
		return nil, err
	}
	if da.chunkShift != shift {
		return fail(fmt.Errorf("restore difference area of %s: chunks of 2^%d bytes now, 2^%d when saved: %w", da.name, da.chunkShift, shift, syscall.EINVAL))
	}
	full := int64(1) << (shift - storage.SectorShift)
	for _, sc := range chunks {
		if sc.Number >= da.chunkCount || sc.Sectors != full || da.lookup(sc.Number) != nil {
			return fail(fmt.Errorf("restore difference area of %s: saved chunk #%d (%d sectors) does not fit: %w", da.name, sc.Number, sc.Sectors, syscall.EINVAL))
		}
		r, err := ds.Region(sc.Dev, sc.Sector, sc.Sectors)
		if err != nil {
			return fail(fmt.Errorf("restore difference area of %s: chunk #%d: %w", da.name, sc.Number, err))
		}
		c := da.newChunk(sc.Number)
		c.region = r
		c.state.Store(uint32(ChunkStored))
		da.chunks.getOrAdd(sc.Number, c)
	}
	return da, nil
}
