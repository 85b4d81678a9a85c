package cow_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/storage"
)

// A snapshot in memory: the original is written after the take, the old
// chunk is copied into the difference storage first, and the image still
// reads what the original held at the take.
func Example() {
	ctx := context.Background()
	params := cow.DefaultParams()
	params.ChunkMinimumShift = 12  // 4 KiB chunks
	params.DiffStorageMinimum = 64 // sectors: 32 KiB

	orig := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	orig.WriteAt(bytes.Repeat([]byte("a"), 1<<20), 0)

	// The difference storage: one range of a second in-memory device.
	ds := storage.New(storage.Options{MinimumSectors: params.DiffStorageMinimum, Logger: slog.New(slog.DiscardHandler)})
	defer ds.Close()
	diff := storage.NewMemDevice("diff", storage.Geometry{Size: 256 << 10})
	if err := ds.AppendDevice(diff, []storage.Range{{Start: 0, Count: 512}}); err != nil {
		fmt.Println(err)
		return
	}

	// The take: writes through the original now copy a chunk first.
	area, err := cow.NewDiffArea(orig, ds, params, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer area.Close(ctx)
	original := cow.NewOriginal(orig)
	original.SetDiffArea(area)
	defer original.SetDiffArea(nil)

	// Requests are whole sectors, as the block layer sends them.
	sector := bytes.Repeat([]byte("b"), storage.SectorSize)
	if err := original.Write(ctx, 8192, sector, false); err != nil {
		fmt.Println(err)
		return
	}
	img := make([]byte, storage.SectorSize)
	if err := area.ReadImage(ctx, img, 8192, false); err != nil {
		fmt.Println(err)
		return
	}
	now := make([]byte, storage.SectorSize)
	orig.ReadAt(now, 8192)
	fmt.Printf("original %q, image %q, chunks copied %d\n", now[:4], img[:4], area.Stats().Chunks)
	// Output: original "bbbb", image "aaaa", chunks copied 1
}
