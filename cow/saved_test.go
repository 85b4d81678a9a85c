package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/ublksnap/ublksnap/storage"
)

// A difference area saved after writes to the original and to the image,
// and restored over its storage reopened from the layout, shows the same
// image; later writes to the original leave it unchanged.
func TestSaveAndRestoreDiffArea(t *testing.T) {
	p := testParams()
	dir := t.TempDir()
	origPath := filepath.Join(dir, "orig")
	if err := os.WriteFile(origPath, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev, err := storage.Open(origPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	snapData := fillRandom(t, dev, 1)
	storePath := filepath.Join(dir, "store")
	if err := os.WriteFile(storePath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ds, err := storage.NewFile(storePath, 8192, storage.Options{MinimumSectors: p.DiffStorageMinimum})
	if err != nil {
		t.Fatal(err)
	}
	da, err := NewDiffArea(dev, ds, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	orig := NewOriginal(dev)
	orig.SetDiffArea(da)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(2, 3))
	buf := make([]byte, 8192)
	for i := 0; i < 60; i++ {
		off := int64(rng.IntN(len(snapData)-len(buf))) &^ 511
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		if err := orig.Write(ctx, off, buf, false); err != nil {
			t.Fatal(err)
		}
	}
	// A write to the image changes what it shows.
	img := bytes.Clone(snapData)
	copy(img[4096:8192], bytes.Repeat([]byte{0xee}, 4096))
	if err := da.WriteImage(ctx, img[4096:8192], 4096, false); err != nil {
		t.Fatal(err)
	}

	if err := da.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	saved, err := da.Saved()
	if err != nil {
		t.Fatal(err)
	}
	layout, err := ds.Layout()
	if err != nil {
		t.Fatal(err)
	}
	shift := da.ChunkShift()
	orig.SetDiffArea(nil)
	if err := da.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ds.Close(); err != nil {
		t.Fatal(err)
	}

	ds2, err := storage.Restore(layout, nil, storage.Options{MinimumSectors: p.DiffStorageMinimum})
	if err != nil {
		t.Fatal(err)
	}
	da2, err := RestoreDiffArea(dev, ds2, p, nil, shift, saved)
	if err != nil {
		t.Fatal(err)
	}
	orig.SetDiffArea(da2)
	defer func() {
		orig.SetDiffArea(nil)
		da2.Close(ctx)
		ds2.Close()
	}()
	got := make([]byte, len(img))
	if err := da2.ReadImage(ctx, got, 0, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("the restored image differs from the saved one")
	}
	// Writes after the restore copy the chunks not yet copied, and only those.
	if err := orig.Write(ctx, 0, make([]byte, len(snapData)), false); err != nil {
		t.Fatal(err)
	}
	if err := da2.ReadImage(ctx, got, 0, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("writes to the original after the restore changed the image")
	}
}

// Saved refuses an area whose chunks are still in memory, and a restore
// refuses chunks that do not fit the device.
func TestSavedNeedsDrainAndRestoreChecks(t *testing.T) {
	p := testParams()
	p.ChunkMaximumInQueue = 1 << 20 // nothing is stored on its own
	dev := storage.NewMemDevice("orig", storage.Geometry{Size: 1 << 20})
	e := newTestEnv(t, dev, memStorage(t, 4096, p, nil), p)
	if err := e.orig.Write(context.Background(), 0, make([]byte, 4096), false); err != nil {
		t.Fatal(err)
	}
	if _, err := e.da.Saved(); !errors.Is(err, ErrNotDrained) {
		t.Fatalf("Saved before Drain: %v, want ErrNotDrained", err)
	}
	if _, err := RestoreDiffArea(dev, e.ds, p, nil, e.da.ChunkShift(), []SavedChunk{{Number: 1 << 40, Sectors: 8}}); err == nil {
		t.Fatal("a chunk beyond the device was restored")
	}
	if _, err := RestoreDiffArea(dev, e.ds, p, nil, e.da.ChunkShift()+1, nil); err == nil {
		t.Fatal("a different chunk size was accepted")
	}
}
