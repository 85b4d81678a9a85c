package storage

import (
	"os"
	"path/filepath"
	"testing"
)

// FileExtents cannot be checked against the disk here; it must at least
// find data where a file has some, none in a hole, and end.
func TestFileExtents(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ext, err := FileExtents(f)
	if err != nil {
		t.Skipf("no FIEMAP on this filesystem: %v", err)
	}
	if len(ext) != 0 {
		t.Fatalf("an empty file has extents %v", ext)
	}
	data := make([]byte, 64<<10)
	for i := range data {
		data[i] = 1
	}
	if _, err := f.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	ext, err = FileExtents(f)
	if err != nil {
		t.Fatal(err)
	}
	var sectors int64
	for _, e := range ext {
		sectors += e.Count
	}
	if sectors < 128 {
		t.Fatalf("64 KiB of data in %v (%d sectors)", ext, sectors)
	}
}
