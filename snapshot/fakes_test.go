package snapshot

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/ublk"
)

// fakeServer is a BlockServer that serves nothing: its devices only
// record their handler. Its kernel table answers Scan and lets tests
// crash the daemon (crash) and recover. Hooks let tests look at the moment
// a device is served and make Close hang.
type fakeServer struct {
	mu      sync.Mutex
	next    int                                   // number of the next device; guarded by mu
	devNum  func(n int) uint64                    // device number of device n; nil: 1000+n
	onServe func(cfg ublk.Config, h ublk.Handler) // called by Serve, if set
	closeCh chan struct{}                         // if set, Close waits until it is closed
	closing chan struct{}                         // if set with closeCh, Close sends on it before it waits
	served  []*fakeBlock                          // guarded by mu
	kernel  map[int]*ublk.Info                    // the devices that exist, by number; guarded by mu
	removed []int                                 // numbers passed to Remove; guarded by mu
}

type fakeBlock struct {
	srv    *fakeServer
	n      int
	path   string
	dev    uint64
	h      ublk.Handler
	files  []int // the descriptors its config registers (ublk.Config.Files)
	mu     sync.Mutex
	closed bool // guarded by mu
	dead   bool // its server crashed: Close leaves the kernel alone; guarded by srv.mu
}

func (s *fakeServer) Serve(_ context.Context, cfg ublk.Config, h ublk.Handler) (BlockDevice, error) {
	if s.onServe != nil {
		s.onServe(cfg, h)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.next
	s.next++
	var flags uint64
	if cfg.Recoverable {
		flags = 1 << 3
	}
	if s.kernel == nil {
		s.kernel = map[int]*ublk.Info{}
	}
	s.kernel[n] = &ublk.Info{ID: n, State: ublk.StateLive, Owner: cfg.Owner, Flags: flags, Size: cfg.Size}
	return s.blockLocked(n, h, cfg.Files), nil
}

func (s *fakeServer) blockLocked(n int, h ublk.Handler, files []int) *fakeBlock {
	dev := uint64(1000 + n)
	if s.devNum != nil {
		dev = s.devNum(n)
	}
	b := &fakeBlock{srv: s, n: n, path: fmt.Sprintf("/dev/fake%d", n), dev: dev, h: h, files: files}
	s.served = append(s.served, b)
	return b
}

// crash is the death of the serving process: recoverable devices wait
// for a new server, the others stop; nothing is closed.
func (s *fakeServer) crash() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, info := range s.kernel {
		info.State = ublk.StateDead
		if info.Flags&(1<<3) != 0 {
			info.State = ublk.StateQuiesced
		}
	}
	for _, b := range s.served {
		b.dead = true
	}
	s.served = nil
}

func (s *fakeServer) Recover(_ context.Context, n int, cfg ublk.Config, h ublk.Handler) (BlockDevice, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	info, ok := s.kernel[n]
	switch {
	case !ok:
		return nil, syscall.ENODEV
	case info.State != ublk.StateQuiesced || info.Owner != cfg.Owner || info.Size != cfg.Size || !cfg.Recoverable:
		return nil, fmt.Errorf("%w: device %d is %s", ublk.ErrNotRecoverable, n, info.State)
	}
	info.State = ublk.StateLive
	return s.blockLocked(n, h, cfg.Files), nil
}

func (s *fakeServer) Scan() ([]ublk.Info, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []ublk.Info
	for _, info := range s.kernel {
		out = append(out, *info)
	}
	return out, nil
}

func (s *fakeServer) Remove(n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.removed = append(s.removed, n)
	if _, ok := s.kernel[n]; !ok {
		return syscall.ENODEV
	}
	delete(s.kernel, n)
	return nil
}

func (b *fakeBlock) ID() int        { return b.n }
func (b *fakeBlock) Path() string   { return b.path }
func (b *fakeBlock) DevNum() uint64 { return b.dev }

func (b *fakeBlock) IOMode() ublk.IOMode { return ublk.IOModeCopy }
func (b *fakeBlock) Close() error {
	if b.srv.closeCh != nil {
		if b.srv.closing != nil {
			b.srv.closing <- struct{}{}
		}
		<-b.srv.closeCh
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return fmt.Errorf("%s closed twice", b.path)
	}
	b.closed = true
	b.srv.mu.Lock()
	if !b.dead {
		delete(b.srv.kernel, b.n)
	}
	b.srv.mu.Unlock()
	return nil
}

// fakeHost records freezes and answers Holders from a table.
type fakeHost struct {
	mu      sync.Mutex
	frozen  map[uint64]bool     // devices frozen now; guarded by mu
	ever    map[uint64]bool     // devices frozen at some time; guarded by mu
	holders map[uint64][]string // answers of Holders; guarded by mu
	hang    chan struct{}       // if set, Freeze waits until it is closed
	entered chan uint64         // if set, Freeze sends its device here first
}

func newFakeHost() *fakeHost {
	return &fakeHost{frozen: map[uint64]bool{}, ever: map[uint64]bool{}, holders: map[uint64][]string{}}
}

func (h *fakeHost) Freeze(_ context.Context, dev uint64) (func() error, error) {
	if h.entered != nil {
		h.entered <- dev
	}
	if h.hang != nil {
		<-h.hang
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.frozen[dev] = true
	h.ever[dev] = true
	return func() error {
		h.mu.Lock()
		defer h.mu.Unlock()
		delete(h.frozen, dev)
		return nil
	}, nil
}

func (h *fakeHost) Thaw(_ context.Context, dev uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.frozen, dev)
	return nil
}

func (h *fakeHost) wasFrozen(dev uint64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ever[dev]
}

func (h *fakeHost) isFrozen(dev uint64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.frozen[dev]
}

func (h *fakeHost) setHolders(dev uint64, holders ...string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.holders[dev] = holders
}

func (h *fakeHost) Holders(_ context.Context, dev uint64, _ string) ([]string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.holders[dev], nil
}

// testParams are blksnap's defaults with small chunks and storage steps.
func testParams() cow.Params {
	p := cow.DefaultParams()
	p.ChunkMinimumShift = 16
	p.DiffStorageMinimum = 1 << 11 // 1 MiB
	return p
}

// env is a Manager over fakes and files in a temporary directory.
type env struct {
	t    *testing.T
	m    *Manager
	srv  *fakeServer
	host *fakeHost
	dir  string
}

func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	e := &env{t: t, srv: &fakeServer{}, host: newFakeHost(), dir: t.TempDir()}
	if cfg.Server == nil {
		cfg.Server = e.srv
	}
	cfg.Host = e.host
	if cfg.Params == (cow.Params{}) {
		cfg.Params = testParams()
	}
	cfg.Logger = slog.New(slog.NewTextHandler(testLog{t}, nil))
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.m = m
	t.Cleanup(func() {
		if err := e.m.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

// file creates a file of size bytes filled with fill.
func (e *env) file(name string, size int, fill byte) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	buf := make([]byte, size)
	for i := range buf {
		buf[i] = fill
	}
	if err := os.WriteFile(p, buf, 0o600); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// attach attaches a new 4 MiB backing file and returns the device node.
func (e *env) attach(name string, fill byte) string {
	e.t.Helper()
	d, err := e.m.Attach(context.Background(), AttachOptions{Backing: e.file(name, 4<<20, fill)})
	if err != nil {
		e.t.Fatal(err)
	}
	return d.Path
}

// dirDev is the device number of the filesystem holding the test directory.
func (e *env) dirDev() uint64 {
	var st unix.Stat_t
	if err := unix.Stat(e.dir, &st); err != nil {
		e.t.Fatal(err)
	}
	return st.Dev
}

// testLog sends log lines to the test's log.
type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
