package cow

import (
	"sync"
	"testing"
)

// Goroutines adding the same chunks at once all get one chunk per number;
// each walks them in order; a device of 2^40 chunks keeps its last one.
func TestChunkTable(t *testing.T) {
	const count = 10000
	tab := newChunkTable(count)
	got := make([][]*Chunk, 4)
	var wg sync.WaitGroup
	for g := range got {
		got[g] = make([]*Chunk, count)
		wg.Go(func() {
			for nr := range uint64(count) {
				got[g][nr] = tab.getOrAdd(nr, &Chunk{number: nr})
			}
		})
	}
	wg.Wait()
	for nr := range count {
		for g := 1; g < len(got); g++ {
			if got[g][nr] != got[0][nr] || tab.lookup(uint64(nr)) != got[0][nr] {
				t.Fatalf("chunk %d: different chunks for one number", nr)
			}
		}
	}
	next := uint64(0)
	tab.each(func(c *Chunk) bool {
		if c.number != next {
			t.Fatalf("each gave chunk %d, want %d", c.number, next)
		}
		next++
		return true
	})
	if tab.lookup(count) != nil || tab.lookup(1<<40) != nil {
		t.Error("a lookup out of range found a chunk")
	}
	huge := newChunkTable(1 << 40)
	c := &Chunk{number: 1<<40 - 1}
	if huge.getOrAdd(1<<40-1, c) != c || huge.lookup(1<<40-1) != c {
		t.Error("the last chunk of a huge device is not kept")
	}
}
