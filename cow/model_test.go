package cow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/ublksnap/ublksnap/storage"
)

// modelRun drives concurrent random requests on the original and the image
// of one snapshot and checks them against a model: the image must always
// show the data at the time of the snapshot plus the image's own writes,
// and the original must always show its newest data. Requests that share
// a sector are serialised (their order would otherwise be undefined);
// requests to different sectors of one chunk run at once.
type modelRun struct {
	t       *testing.T
	e       *testEnv
	size    int64
	chunk   int64
	src     []byte // random bytes that writes take their data from
	origMu  *rangeLocks
	imgMu   *rangeLocks
	origMod []byte // what the original must hold; guarded by origMu stripes
	imgMod  []byte // what the image must show; guarded by imgMu stripes
}

// randRange picks a request: sizes from 512 B to 1 MiB (log-uniform), at
// random sector offsets or on the edges that matter: the first sector, the
// last sector and the short last chunk, chunk boundaries, straddles; and
// one in five a sector or two in one of the first hotChunks chunks, so
// that several workers meet in one chunk, at different sectors of it.
func (m *modelRun) randRange(r *rand.Rand) (off, n int64) {
	const hotChunks = 4
	sectors := m.size / storage.SectorSize
	n = int64(1) << r.IntN(12) // 1..2048 sectors
	n = min(n+r.Int64N(n), 2048, sectors)
	switch r.IntN(10) {
	case 8, 9: // in a hot chunk
		n = 1 + r.Int64N(2)
		off = r.Int64N(hotChunks*m.chunk/storage.SectorSize - n)
	case 0: // first sector
		off = 0
	case 1: // ends on the last sector
		off = sectors - n
	case 2: // chunk aligned
		off = r.Int64N(sectors) / (m.chunk / storage.SectorSize) * (m.chunk / storage.SectorSize)
	case 3: // straddles a chunk boundary
		b := (1 + r.Int64N(sectors/(m.chunk/storage.SectorSize))) * (m.chunk / storage.SectorSize)
		off = b - 1 - r.Int64N(min(n, b))
	default:
		off = r.Int64N(sectors)
	}
	off = max(0, min(off, sectors-n))
	return off * storage.SectorSize, n * storage.SectorSize
}

func (m *modelRun) data(r *rand.Rand, n int64) []byte {
	at := r.Int64N(int64(len(m.src)) - n)
	return m.src[at : at+n]
}

// worker runs ops random requests.
func (m *modelRun) worker(seed uint64, ops int, failed func(string, ...any)) {
	r := rand.New(rand.NewPCG(seed, 2))
	ctx := context.Background()
	buf := make([]byte, 1<<20)
	for i := 0; i < ops; i++ {
		off, n := m.randRange(r)
		switch k := r.IntN(100); {
		case k < 35: // write the original, in one of its three ways
			p := m.data(r, n)
			m.origMu.lock(off, n)
			var err error
			switch r.IntN(3) {
			case 0:
				err = m.e.orig.Write(ctx, off, p, false)
			case 1:
				if err = m.e.orig.Write(ctx, off, p, true); err == ErrWouldBlock {
					err = m.e.orig.Write(ctx, off, p, false)
				}
			case 2:
				done := make(chan error, 1)
				if err = m.e.orig.WriteAsync(off, p, func(err error) { done <- err }); err == ErrPending {
					err = <-done
				}
			}
			if err != nil {
				failed("write original [%d+%d]: %v", off, n, err)
			}
			copy(m.origMod[off:], p)
			m.origMu.unlock(off, n)
		case k < 42: // discard or zero the original
			m.origMu.lock(off, n)
			var err error
			if k%2 == 0 {
				err = m.e.orig.WriteZeroes(ctx, off, n, false)
			} else {
				err = m.e.orig.Discard(ctx, off, n, false)
			}
			if err != nil {
				failed("zero original [%d+%d]: %v", off, n, err)
			}
			clear(m.origMod[off : off+n])
			m.origMu.unlock(off, n)
		case k < 62: // write the image
			p := m.data(r, n)
			m.imgMu.lock(off, n)
			err := m.e.da.WriteImage(ctx, p, off, false)
			if err != nil {
				failed("write image [%d+%d]: %v", off, n, err)
			}
			copy(m.imgMod[off:], p)
			m.imgMu.unlock(off, n)
		case k < 66: // zero the image
			m.imgMu.lock(off, n)
			if err := m.e.da.WriteZeroesImage(ctx, off, n, false); err != nil {
				failed("zero image [%d+%d]: %v", off, n, err)
			}
			clear(m.imgMod[off : off+n])
			m.imgMu.unlock(off, n)
		case k < 90: // read the image
			p := buf[:n]
			m.imgMu.lock(off, n)
			err := m.e.da.ReadImage(ctx, p, off, k%3 == 0)
			if err == ErrWouldBlock {
				err = m.e.da.ReadImage(ctx, p, off, false)
			}
			if err != nil {
				failed("read image [%d+%d]: %v", off, n, err)
			} else if !bytes.Equal(p, m.imgMod[off:off+n]) {
				failed("read image [%d+%d]: differs from the model at byte %d", off, n, firstDiff(p, m.imgMod[off:]))
			}
			m.imgMu.unlock(off, n)
		default: // read the original
			p := buf[:n]
			m.origMu.lock(off, n)
			if err := m.e.orig.Read(p, off, false); err != nil {
				failed("read original [%d+%d]: %v", off, n, err)
			} else if !bytes.Equal(p, m.origMod[off:off+n]) {
				failed("read original [%d+%d]: differs from the model at byte %d", off, n, firstDiff(p, m.origMod[off:]))
			}
			m.origMu.unlock(off, n)
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestModel runs the model with several seeds, on in-memory devices and on
// files (the difference storage then being a growable unnamed file), where
// chunks are saved by an in-kernel copy ("file") or through buffers
// ("file-buffers"). UBLKSNAP_MODEL_OPS sets the requests per worker (300;
// 125000 makes the 10^6 requests of a long run).
func TestModel(t *testing.T) {
	const (
		size    = 32<<20 + 1536 // the last 4 KiB chunk has 3 sectors
		workers = 8
	)
	ops := 300
	if v := os.Getenv("UBLKSNAP_MODEL_OPS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("UBLKSNAP_MODEL_OPS=%q: want a positive count", v)
		}
		ops = n
	}
	for _, backing := range []string{"mem", "file", "file-buffers"} {
		for seed := uint64(1); seed <= 3; seed++ {
			t.Run(fmt.Sprintf("%s/seed=%d", backing, seed), func(t *testing.T) {
				p := testParams()
				if backing == "file-buffers" {
					p.ChunkCopyInKernel = 0
				}
				var dev storage.Device
				var ds *storage.DiffStorage
				if backing == "mem" {
					dev = storage.NewMemDevice("orig", storage.Geometry{Size: size})
					ds = memStorage(t, (size+1<<20)>>storage.SectorShift, p, nil)
				} else {
					dir := t.TempDir()
					path := filepath.Join(dir, "orig")
					if err := os.WriteFile(path, nil, 0o600); err != nil {
						t.Fatal(err)
					}
					if err := os.Truncate(path, size); err != nil {
						t.Fatal(err)
					}
					f, err := storage.Open(path)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { f.Close() })
					dev = f
					ds, err = storage.NewFile(dir, (size+2<<20)>>storage.SectorShift, storage.Options{MinimumSectors: p.DiffStorageMinimum})
					if err != nil {
						t.Fatal(err)
					}
				}
				initial := fillRandom(t, dev, seed)
				e := newTestEnv(t, dev, ds, p)
				m := &modelRun{
					t: t, e: e, size: size, chunk: e.da.ChunkSize(),
					src:     make([]byte, 4<<20),
					origMu:  newRangeLocks(size, storage.SectorSize),
					imgMu:   newRangeLocks(size, storage.SectorSize),
					origMod: initial,
					imgMod:  bytes.Clone(initial),
				}
				r := rand.New(rand.NewPCG(seed, 3))
				for i := range m.src {
					m.src[i] = byte(r.Uint32())
				}
				var failMu sync.Mutex
				failures := 0
				failed := func(format string, args ...any) {
					failMu.Lock()
					defer failMu.Unlock()
					if failures++; failures <= 10 {
						t.Errorf(format, args...)
					}
				}
				var wg sync.WaitGroup
				for w := range workers {
					wg.Go(func() { m.worker(seed*100+uint64(w), ops, failed) })
				}
				wg.Wait()

				// Everything, once more, with no request in flight.
				got := make([]byte, size)
				if err := e.da.ReadImage(context.Background(), got, 0, false); err != nil {
					t.Fatalf("read whole image: %v", err)
				}
				if i := firstDiff(got, m.imgMod); i >= 0 {
					t.Errorf("image differs from the model at byte %d (chunk %d)", i, int64(i)/m.chunk)
				}
				if err := e.orig.Read(got, 0, false); err != nil {
					t.Fatalf("read whole original: %v", err)
				}
				if i := firstDiff(got, m.origMod); i >= 0 {
					t.Errorf("original differs from the model at byte %d", i)
				}
				st := e.da.Stats()
				if c, errno := e.da.Corrupted(); c {
					t.Errorf("area corrupted: %v", errno)
				}
				if st.BuffersPeak > st.BuffersLimit {
					t.Errorf("buffers peaked at %d, above the bound %d", st.BuffersPeak, st.BuffersLimit)
				}
				t.Logf("chunks %d (new %d, in memory %d, stored %d, failed %d), %d copied in the kernel, buffers peak %d/%d, storage %+v",
					st.Chunks, st.ChunksInState[ChunkNew], st.ChunksInState[ChunkInMemory], st.ChunksInState[ChunkStored],
					st.ChunksInState[ChunkFailed], st.KernelCopied, st.BuffersPeak, st.BuffersLimit, ds.Stats())
				if (st.KernelCopied > 0) != (backing == "file") {
					t.Errorf("%d chunks copied in the kernel with a %s backing", st.KernelCopied, backing)
				}
				if backing != "mem" && ds.Stats().Capacity <= int64(p.DiffStorageMinimum) {
					t.Errorf("the storage never grew (capacity %d sectors): the run did not allocate during growth", ds.Stats().Capacity)
				}
				if st.Chunks < 2000 {
					t.Errorf("only %d chunks touched; the test is too weak", st.Chunks)
				}
			})
		}
	}
}
