package storage

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestAllocationFindsHoles: the runs cover the range, every hole reads as
// zeros, every written range is data, and maxSpans is kept.
func TestAllocationFindsHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sparse")
	const size = 4 << 20
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	f, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	written := []int64{64 << 10, 1 << 20, 3<<20 + 8192}
	for _, off := range written {
		if _, err := f.WriteAt(bytes.Repeat([]byte{0xab}, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ off, length int64 }{{0, size}, {4096, 2 << 20}, {1<<20 + 512, 100}, {size - 4096, 1 << 30}} {
		spans, err := f.Allocation(c.off, c.length, 100)
		if err != nil {
			t.Fatal(err)
		}
		pos, holes := c.off, int64(0)
		for i, s := range spans {
			if s.Length <= 0 || (i > 0 && s.Hole == spans[i-1].Hole) {
				t.Fatalf("Allocation(%d, %d): %+v: empty or unmerged runs", c.off, c.length, spans)
			}
			if s.Hole {
				holes += s.Length
				buf := make([]byte, s.Length)
				f.ReadAt(buf, pos)
				if !bytes.Equal(buf, make([]byte, s.Length)) {
					t.Fatalf("Allocation(%d, %d): hole [%d+%d] holds data", c.off, c.length, pos, s.Length)
				}
			}
			for _, w := range written {
				if s.Hole && w < pos+s.Length && pos < w+4096 {
					t.Fatalf("Allocation(%d, %d): written [%d+4096] in hole [%d+%d]", c.off, c.length, w, pos, s.Length)
				}
			}
			pos += s.Length
		}
		if want := min(c.off+c.length, size); pos != want {
			t.Fatalf("Allocation(%d, %d) covers up to %d, want %d", c.off, c.length, pos, want)
		}
		t.Logf("Allocation(%d, %d): %d runs, %d bytes of holes", c.off, c.length, len(spans), holes)
	}
	if spans, _ := f.Allocation(0, size, 2); len(spans) > 2 {
		t.Fatalf("maxSpans 2: %d runs", len(spans))
	}
	if _, err := f.Allocation(size, 1, 1); err == nil {
		t.Fatal("Allocation past the end succeeded")
	}
}
