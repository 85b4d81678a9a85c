package backup

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/ublksnap/ublksnap/cbt"
)

const (
	testBlock = 64 << 10
	testSize  = 3<<20 + 4096 // the last block is partial
)

// chainEnv is a device image in memory and a chain of its backups.
type chainEnv struct {
	t     *testing.T
	dir   string
	image []byte
	last  *Manifest
	n     int
}

func newChainEnv(t *testing.T) *chainEnv {
	return &chainEnv{t: t, dir: t.TempDir(), image: make([]byte, testSize)}
}

// write changes n random blocks of the image and returns their ranges.
func (c *chainEnv) write(r *rand.Rand, n int) []cbt.Extent {
	blocks := map[int64]bool{}
	for range n {
		b := r.Int64N((testSize + testBlock - 1) / testBlock)
		blocks[b] = true
		off := b*testBlock + r.Int64N(testBlock-512)
		for i := off; i < min(off+512, testSize); i++ {
			c.image[i] = byte(r.Uint32())
		}
	}
	var out []cbt.Extent
	for b := int64(0); b*testBlock < testSize; b++ {
		if blocks[b] {
			out = append(out, cbt.Extent{Offset: b * testBlock, Length: min(testBlock, testSize-b*testBlock)})
		}
	}
	return out
}

// backup writes the next backup of the image: full without ranges.
func (c *chainEnv) backup(ranges []cbt.Extent) *Manifest {
	c.t.Helper()
	opt := Options{Dir: filepath.Join(c.dir, "b"+strconv.Itoa(c.n)), Device: "d", DeviceSize: testSize, BlockSize: testBlock,
		Generation: "g", Changes: uint8(c.n + 1), Ranges: ranges}
	if ranges == nil {
		opt.Ranges = []cbt.Extent{{Offset: 0, Length: testSize}}
	} else {
		opt.Previous = c.last
	}
	m, err := Write(context.Background(), bytes.NewReader(c.image), opt)
	if err != nil {
		c.t.Fatal(err)
	}
	c.n++
	c.last = m
	return m
}

// restore restores m and returns the image.
func (c *chainEnv) restore(m *Manifest) ([]byte, error) {
	out := filepath.Join(c.t.TempDir(), "restored")
	chain, err := Chain(m)
	if err != nil {
		return nil, err
	}
	if _, err := Restore(context.Background(), chain, out, nil); err != nil {
		return nil, err
	}
	return os.ReadFile(out)
}

func TestChainRestoresEveryImage(t *testing.T) {
	c := newChainEnv(t)
	r := rand.New(rand.NewPCG(1, 2))
	c.write(r, 20)
	var images [][]byte
	var manifests []*Manifest
	for i := range 12 {
		var ranges []cbt.Extent
		if i > 0 {
			ranges = c.write(r, 1+r.IntN(6))
		}
		m := c.backup(ranges)
		if i > 0 && m.Bytes() > int64(len(ranges))*testBlock {
			t.Fatalf("backup %d holds %d bytes for %d changed blocks", i, m.Bytes(), len(ranges))
		}
		images = append(images, bytes.Clone(c.image))
		manifests = append(manifests, m)
	}
	for i, m := range manifests {
		got, err := c.restore(m)
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		if !bytes.Equal(got, images[i]) {
			t.Fatalf("restore of backup %d differs from its image", i)
		}
	}
}

func TestZerosStaySparse(t *testing.T) {
	c := newChainEnv(t)
	c.image[testSize-1] = 1
	m := c.backup(nil)
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(m.dir(), DataName), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 2*pieceSize {
		t.Fatalf("a nearly empty %d-byte image takes %d bytes", testSize, st.Blocks*512)
	}
	got, err := c.restore(m)
	if err != nil || !bytes.Equal(got, c.image) {
		t.Fatalf("restore: %v", err)
	}
}

func TestBrokenChains(t *testing.T) {
	for name, breakIt := range map[string]func(full, mid *Manifest) error{
		"missing data": func(full, _ *Manifest) error { return os.Remove(filepath.Join(full.dir(), DataName)) },
		"missing link": func(full, _ *Manifest) error { return os.Remove(full.path) },
		"altered data": func(_, mid *Manifest) error {
			f, err := os.OpenFile(filepath.Join(mid.dir(), DataName), os.O_RDWR, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteAt([]byte{0xff}, mid.Extents[0].Offset)
			return err
		},
		"altered manifest": func(full, _ *Manifest) error {
			b, err := os.ReadFile(full.path)
			if err != nil {
				return err
			}
			return os.WriteFile(full.path, append(b, ' '), 0o644)
		},
	} {
		t.Run(name, func(t *testing.T) {
			c := newChainEnv(t)
			r := rand.New(rand.NewPCG(3, 4))
			c.write(r, 10)
			full := c.backup(nil)
			mid := c.backup(c.write(r, 3))
			last := c.backup(c.write(r, 3))
			if err := breakIt(full, mid); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(t.TempDir(), "restored")
			chain, err := Chain(last)
			if err == nil {
				_, err = Restore(context.Background(), chain, out, nil)
			}
			if !errors.Is(err, ErrChain) {
				t.Fatalf("restore of a chain with %s: %v", name, err)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Fatal("a failed restore left its output")
			}
			if _, err := os.Stat(out + ".partial"); !os.IsNotExist(err) {
				t.Fatal("a failed restore left its partial output")
			}
		})
	}
}

func TestRestoreNeverOverwrites(t *testing.T) {
	c := newChainEnv(t)
	m := c.backup(nil)
	out := filepath.Join(t.TempDir(), "exists")
	os.WriteFile(out, []byte("keep"), 0o644)
	if _, err := Restore(context.Background(), []*Manifest{m}, out, nil); !errors.Is(err, os.ErrExist) {
		t.Fatalf("restore over a file: %v", err)
	}
	if b, _ := os.ReadFile(out); string(b) != "keep" {
		t.Fatal("restore wrote over an existing file")
	}
	if _, err := Write(context.Background(), bytes.NewReader(c.image), Options{Dir: m.dir(), Device: "d",
		DeviceSize: testSize, BlockSize: testBlock, Ranges: []cbt.Extent{{Offset: 0, Length: testSize}}}); !errors.Is(err, os.ErrExist) {
		t.Fatalf("a backup into a backup's directory: %v", err)
	}
	if _, err := c.restore(m); err != nil {
		t.Fatalf("the refused backup damaged the existing one: %v", err)
	}
}
