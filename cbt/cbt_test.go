package cbt

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"sync"
	"testing"

	"github.com/google/uuid"
)

var defaults = Params{MinShift: 16, MaxShift: 26, MaxCount: 2097152}

func TestBlockShift(t *testing.T) {
	for _, c := range []struct {
		capacity int64
		shift    uint
	}{
		{1 << 20, 16}, {128 << 30, 16}, {128<<30 + 1, 17}, {1 << 40, 19}, {10 << 40, 23}, {128 << 40, 26}, {1 << 50, 26},
	} {
		if got := defaults.BlockShift(c.capacity); got != c.shift {
			t.Errorf("BlockShift(%d) = %d, want %d", c.capacity, got, c.shift)
		}
	}
}

// changed returns the extents changed since p.
func changed(m *Map, p Point) ([]Extent, bool) {
	rm, info := m.ReadMap()
	return Changed(rm, info, p)
}

func TestIntervals(t *testing.T) {
	const bs = 1 << 16
	m := New(10*bs+512, defaults) // 11 blocks, the last of 512 bytes
	if info := m.Info(); info.BlockCount != 11 || info.BlockSize != bs || info.Changes != 0 {
		t.Fatalf("fresh map: %+v", info)
	}
	m.Mark(0, 1)           // block 0
	m.Mark(10*bs, 512)     // the last, partial block
	m.Mark(3*bs-512, 1024) // blocks 2 and 3
	first := m.Switch()    // take 1
	if first.Changes != 1 {
		t.Fatalf("after the first take: changes %d, want 1", first.Changes)
	}
	ext, full := changed(m, Point{Generation: first.Generation, Changes: 0})
	want := []Extent{{0, bs}, {2 * bs, 2 * bs}, {10 * bs, 512}}
	if full || !reflect.DeepEqual(ext, want) {
		t.Fatalf("changed since 0: %v full %v, want %v", ext, full, want)
	}
	// Nothing written between two takes: nothing changed.
	second := m.Switch()
	if ext, full := changed(m, Point{first.Generation, first.Changes}); full || len(ext) != 0 {
		t.Fatalf("nothing written: %v full %v", ext, full)
	}
	m.Mark(5*bs, bs)
	third := m.Switch()
	ext, _ = changed(m, Point{second.Generation, second.Changes})
	if !reflect.DeepEqual(ext, []Extent{{5 * bs, bs}}) {
		t.Fatalf("changed since take 2: %v", ext)
	}
	// Since take 1 (a differential): the same block.
	if ext2, _ := changed(m, Point{first.Generation, first.Changes}); !reflect.DeepEqual(ext2, ext) {
		t.Fatalf("since take 1: %v", ext2)
	}
	if third.Generation != first.Generation {
		t.Fatal("generation changed without a reason")
	}
	// Another generation, or a number from the future: everything.
	ext, full = changed(m, Point{Changes: 1})
	if !full || !reflect.DeepEqual(ext, []Extent{{0, 10*bs + 512}}) {
		t.Fatalf("other generation: %v full %v", ext, full)
	}
	if _, full := changed(m, Point{third.Generation, 200}); !full {
		t.Fatal("a number newer than the map is not full")
	}
}

func TestMarkBothCountsNowAndNext(t *testing.T) {
	const bs = 1 << 16
	m := New(8*bs, defaults)
	a := m.Switch()
	b := m.Switch()
	// An image write or a dirty range while snapshot b is held.
	if err := m.MarkBoth(bs, 2*bs); err != nil {
		t.Fatal(err)
	}
	if ext, _ := changed(m, Point{a.Generation, a.Changes}); !reflect.DeepEqual(ext, []Extent{{bs, 2 * bs}}) {
		t.Fatalf("this backup: %v", ext)
	}
	m.Switch()
	if ext, _ := changed(m, Point{b.Generation, b.Changes}); !reflect.DeepEqual(ext, []Extent{{bs, 2 * bs}}) {
		t.Fatalf("next backup: %v", ext)
	}
}

func TestWrapStartsAGeneration(t *testing.T) {
	const bs = 1 << 16
	m := New(4*bs, defaults)
	first := m.Info().Generation
	var last Info
	for i := 0; i < 254; i++ {
		m.Mark(int64(i%4)*bs, 1)
		last = m.Switch()
	}
	if last.Changes != 254 || last.Generation != first {
		t.Fatalf("after 254 takes: %+v", last)
	}
	m.Mark(0, 1)
	wrapped := m.Switch()
	if wrapped.Generation == first {
		t.Fatal("take 255 kept the generation")
	}
	rm, _ := m.ReadMap()
	for i, v := range rm {
		if v > wrapped.Changes {
			t.Fatalf("read map byte %d = %d after the wrap to changes %d: stale", i, v, wrapped.Changes)
		}
	}
	if _, full := changed(m, Point{first, last.Changes}); !full {
		t.Fatal("a backup of the old generation is not told to make a full one")
	}
}

func TestOutOfRangeCorrupts(t *testing.T) {
	m := New(1<<20, defaults)
	gen := m.Info().Generation
	if err := m.MarkBoth(1<<20-512, 1024); err == nil {
		t.Fatal("a range past the end was accepted")
	}
	if err := m.MarkBoth(-1, 1); err == nil {
		t.Fatal("a negative offset was accepted")
	}
	if _, err := m.MarshalBinary(); err == nil {
		t.Fatal("a corrupted map was saved")
	}
	if m.Switch().Generation == gen {
		t.Fatal("a corrupted map kept its generation")
	}
}

func TestSaveLoad(t *testing.T) {
	const capacity = 3<<20 + 4096
	m := New(capacity, defaults)
	m.Mark(0, 4096)
	m.Switch()
	m.Mark(capacity-1, 1)
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	l, err := Load(b, capacity, defaults)
	if err != nil {
		t.Fatal(err)
	}
	if l.Info() != m.Info() || !reflect.DeepEqual(l.write.bytes(), m.write.bytes()) || !reflect.DeepEqual(l.read, m.read) || l.active.Load() != m.active.Load() {
		t.Fatalf("loaded %+v, saved %+v", l.Info(), m.Info())
	}
	if _, err := Load(b, capacity+4096, defaults); err == nil {
		t.Fatal("a map of another size was loaded")
	}
	if _, err := Load(b, capacity, Params{MinShift: 12, MaxShift: 26, MaxCount: 1 << 21}); err == nil {
		t.Fatal("a map of another block size was loaded")
	}
	for _, i := range []int{0, 9, 30, headerSize + 1, len(b) - 1} {
		bad := append([]byte(nil), b...)
		bad[i] ^= 1
		if _, err := Load(bad, capacity, defaults); err == nil {
			t.Errorf("a map with byte %d flipped was loaded", i)
		}
	}
	if _, err := Load(b[:len(b)-1], capacity, defaults); err == nil {
		t.Fatal("a truncated map was loaded")
	}
}

// TestConcurrentMarks marks from many goroutines across takes and checks
// the result against a model: each block's write byte is the newest
// interval it was written in.
func TestConcurrentMarks(t *testing.T) {
	const bs, n = 1 << 16, 64
	m := New(n*bs, defaults)
	for round := 0; round < 20; round++ {
		active := m.Info().Changes + 1
		written := make([]bool, n)
		var mu sync.Mutex
		var wg sync.WaitGroup
		for g := 0; g < 8; g++ {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(round), uint64(g)))
				for range 200 {
					off := r.Int64N(n*bs - 8192)
					m.Mark(off, 8192)
					mu.Lock()
					for b := off / bs; b <= (off+8191)/bs; b++ {
						written[b] = true
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		m.Switch()
		rm, _ := m.ReadMap()
		for b, w := range written {
			if w != (rm[b] == active) {
				t.Fatalf("round %d block %d: written %v, map %d, active %d", round, b, w, rm[b], active)
			}
		}
	}
}

func TestParsePoint(t *testing.T) {
	m := New(1<<20, defaults)
	p := Point{m.Info().Generation, 7}
	if got, err := ParsePoint(p.String()); err != nil || got != p {
		t.Fatalf("ParsePoint(%s) = %v, %v", p, got, err)
	}
	for _, s := range []string{"", "7", p.Generation.String() + ":256", "nope:1", p.Generation.String() + ":-1"} {
		if _, err := ParsePoint(s); err == nil {
			t.Errorf("ParsePoint(%q) accepted", s)
		}
	}
}

func BenchmarkMark4K(b *testing.B) {
	m := New(1<<30, defaults)
	for i := 0; b.Loop(); i++ {
		m.Mark(int64(i%262144)*4096, 4096)
	}
}

// TestRunsMatchChanged: Runs over random windows agrees block by block
// with Changed, for every point of the history, and refuses points it
// cannot answer.
func TestRunsMatchChanged(t *testing.T) {
	const capacity = 100<<16 + 1000 // 101 blocks, the last partial
	m := New(capacity, defaults)
	rng := rand.New(rand.NewPCG(1, 2))
	for take := 0; take < 6; take++ {
		for i := 0; i < 20; i++ {
			m.Mark(rng.Int64N(capacity-4096)&^511, 4096)
		}
		m.Switch()
	}
	rm, info := m.ReadMap()
	for since := uint8(0); since <= info.Changes; since++ {
		p := Point{info.Generation, since}
		changed := make([]bool, capacity>>9+1)
		ext, _ := Changed(rm, info, p)
		for _, e := range ext {
			for s := e.Offset >> 9; s < (e.Offset+e.Length+511)>>9; s++ {
				changed[s] = true
			}
		}
		for i := 0; i < 50; i++ {
			off := rng.Int64N(capacity) &^ 511
			length := 1 + rng.Int64N(capacity)
			maxRuns := 1 + rng.IntN(8)
			runs, err := m.Runs(p, off, length, maxRuns)
			if err != nil || len(runs) == 0 {
				t.Fatalf("Runs(%v, %d, %d): %v %v", p, off, length, runs, err)
			}
			pos := off
			for j, r := range runs {
				if j > 0 && r.Changed == runs[j-1].Changed {
					t.Fatalf("Runs(%v, %d, %d): runs %d and %d not merged: %v", p, off, length, j-1, j, runs)
				}
				for s := pos >> 9; s < (pos+r.Length+511)>>9; s++ {
					if changed[s] != r.Changed {
						t.Fatalf("Runs(%v, %d, %d): sector %d changed=%v, Changed says %v", p, off, length, s, r.Changed, changed[s])
					}
				}
				pos += r.Length
			}
			if pos > capacity || (len(runs) < maxRuns && pos < min(off+length, capacity)) {
				t.Fatalf("Runs(%v, %d, %d) ends at %d", p, off, length, pos)
			}
		}
	}
	for _, p := range []Point{{uuid.New(), 1}, {info.Generation, info.Changes + 1}} {
		if _, err := m.Runs(p, 0, 4096, 1); !errors.Is(err, ErrOtherGeneration) {
			t.Errorf("Runs since %v: %v, want ErrOtherGeneration", p, err)
		}
	}
	if _, err := m.Runs(Point{info.Generation, 0}, capacity, 1, 1); !errors.Is(err, ErrRange) {
		t.Errorf("Runs past the end: %v", err)
	}
}

// Marks from many goroutines at once, over overlapping ranges, take no
// lock and lose none; the next switch sees them all.
func TestMarkConcurrent(t *testing.T) {
	const blocks = 1000
	m := New(blocks<<16, Params{MinShift: 16, MaxShift: 16, MaxCount: blocks})
	m.Switch() // marks now carry 2
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := g; i < blocks; i += 3 {
				m.Mark(int64(i)<<16, int64(min(2, blocks-i))<<16) // this block and the next
			}
		})
	}
	wg.Wait()
	m.Switch()
	read, info := m.ReadMap()
	for i, v := range read {
		if v != 2 {
			t.Fatalf("block %d of %d carries %d after concurrent marks, want 2 (changes %d)", i, len(read), v, info.Changes)
		}
	}
}
