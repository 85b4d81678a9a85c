package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/internal/testwait"
	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/ublk"
)

// The tests leave no goroutine behind: a Run that returned has ended all
// of its own.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeMajor is the major number of fakeKernel's devices, which no real
// device has: no test file lives on one.
const fakeMajor = 4000

// fakeKernel is a snapshot.BlockServer whose devices serve no I/O. Its
// table of devices outlives the daemons run over it, as the kernel's
// does: exit ends the process of a daemon, and the next Run's Recover
// finds what it left.
type fakeKernel struct {
	mu        sync.Mutex
	next      int                // number of the next device; guarded by mu
	devices   map[int]*fakeEntry // the devices that exist, by number; guarded by mu
	recovered int                // devices handed over by Recover; guarded by mu
}

// fakeEntry is a device of the fakeKernel.
type fakeEntry struct {
	info        ublk.Info  // as Scan reports it; guarded by the kernel's mu
	recoverable bool       // created with ublk.Config.Recoverable; immutable
	server      *fakeBlock // the daemon's handle serving it, or nil; guarded by the kernel's mu
}

// fakeBlock is a device of the fakeKernel as one daemon serves it.
type fakeBlock struct {
	k  *fakeKernel // the kernel that has the device; immutable
	id int         // the device's number; immutable
}

func newFakeKernel() *fakeKernel { return &fakeKernel{devices: map[int]*fakeEntry{}} }

func (k *fakeKernel) Serve(_ context.Context, cfg ublk.Config, _ ublk.Handler) (snapshot.BlockDevice, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	id := k.next
	k.next++
	b := &fakeBlock{k: k, id: id}
	k.devices[id] = &fakeEntry{info: ublk.Info{ID: id, State: ublk.StateLive, Owner: cfg.Owner, Size: cfg.Size},
		recoverable: cfg.Recoverable, server: b}
	return b, nil
}

func (k *fakeKernel) Recover(_ context.Context, id int, cfg ublk.Config, _ ublk.Handler) (snapshot.BlockDevice, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	e, ok := k.devices[id]
	switch {
	case !ok:
		return nil, fmt.Errorf("device %d: %w", id, syscall.ENODEV)
	case e.info.State != ublk.StateQuiesced || e.info.Owner != cfg.Owner || e.info.Size != cfg.Size || !cfg.Recoverable:
		return nil, fmt.Errorf("%w: device %d is %s", ublk.ErrNotRecoverable, id, e.info.State)
	}
	e.info.State = ublk.StateLive
	e.server = &fakeBlock{k: k, id: id}
	k.recovered++
	return e.server, nil
}

func (k *fakeKernel) Scan() ([]ublk.Info, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []ublk.Info
	for _, e := range k.devices {
		out = append(out, e.info)
	}
	return out, nil
}

func (k *fakeKernel) Remove(id int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.devices[id]; !ok {
		return fmt.Errorf("device %d: %w", id, syscall.ENODEV)
	}
	delete(k.devices, id)
	return nil
}

// exit is the end of the process that served the devices: the
// recoverable ones wait for a new server, the others stop.
func (k *fakeKernel) exit() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, e := range k.devices {
		e.info.State, e.server = ublk.StateDead, nil
		if e.recoverable {
			e.info.State = ublk.StateQuiesced
		}
	}
}

// states returns the state of every device, by number.
func (k *fakeKernel) states() map[int]ublk.State {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := map[int]ublk.State{}
	for id, e := range k.devices {
		out[id] = e.info.State
	}
	return out
}

// handedOver is how many devices Recover has handed over.
func (k *fakeKernel) handedOver() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.recovered
}

func (b *fakeBlock) Path() string        { return fmt.Sprintf("/dev/fake-ublkb%d", b.id) }
func (b *fakeBlock) DevNum() uint64      { return unix.Mkdev(fakeMajor, uint32(b.id)) }
func (b *fakeBlock) ID() int             { return b.id }
func (b *fakeBlock) IOMode() ublk.IOMode { return ublk.IOModeCopy }

// Close stops and deletes the device, unless another daemon serves it
// now (this handle's process has ended).
func (b *fakeBlock) Close() error {
	b.k.mu.Lock()
	defer b.k.mu.Unlock()
	if e, ok := b.k.devices[b.id]; ok && e.server == b {
		delete(b.k.devices, b.id)
	}
	return nil
}

// fakeHost freezes nothing and finds no holder.
type fakeHost struct{}

func (fakeHost) Freeze(context.Context, uint64) (func() error, error) {
	return func() error { return nil }, nil
}
func (fakeHost) Thaw(context.Context, uint64) error                        { return nil }
func (fakeHost) Holders(context.Context, uint64, string) ([]string, error) { return nil, nil }

// testLog sends the daemon's log to the test's until the test ends.
type testLog struct {
	t     *testing.T // the test whose log it writes to
	mu    sync.Mutex
	ended bool // guarded by mu
}

func newTestLogger(t *testing.T) *slog.Logger {
	w := &testLog{t: t}
	t.Cleanup(func() { // registered before any Run's, so run after them
		w.mu.Lock()
		defer w.mu.Unlock()
		w.ended = true
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.ended {
		l.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// daemonRun is a Run in a goroutine of its own.
type daemonRun struct {
	t      *testing.T         // the test it runs for
	stop   context.CancelFunc // ends the run's context: a restart
	done   chan struct{}      // closed when Run has returned
	err    error              // what Run returned; written before done is closed
	client *api.Client        // a client of the daemon's socket
}

// startRun runs the daemon of cfg and waits until it answers; the test's
// end stops it as a restart would, if it still runs.
func startRun(t *testing.T, cfg Config) *daemonRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &daemonRun{t: t, stop: cancel, done: make(chan struct{}), client: api.NewClient(cfg.Socket)}
	go func() {
		defer close(r.done)
		r.err = Run(ctx, cfg)
	}()
	t.Cleanup(func() {
		cancel()
		<-r.done
	})
	testwait.For(t, "the daemon to answer on "+cfg.Socket, func() bool {
		if r.ended() {
			return true
		}
		_, err := r.client.Status(context.Background())
		return err == nil
	})
	if r.ended() {
		t.Fatalf("Run returned %v before it answered", r.err)
	}
	return r
}

// ended reports whether Run has returned.
func (r *daemonRun) ended() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// wait waits until Run returns and returns its error.
func (r *daemonRun) wait() error {
	r.t.Helper()
	testwait.For(r.t, "Run to return", r.ended)
	return r.err
}

// runEnv is what the daemons of one test share: the kernel, the socket
// and a directory for files.
type runEnv struct {
	t      *testing.T  // the test
	kernel *fakeKernel // the devices, across the daemons
	dir    string      // the test's files
	cfg    Config      // of every daemon of the test, over kernel
}

func newRunEnv(t *testing.T) *runEnv {
	dir, kernel := t.TempDir(), newFakeKernel()
	params := cow.DefaultParams()
	params.DiffStorageMinimum = 1 << 11 // 1 MiB steps of difference storage, for small files
	return &runEnv{t: t, kernel: kernel, dir: dir, cfg: Config{
		Socket: filepath.Join(dir, "run", "ublksnap.sock"), Params: params, IOMode: ublk.IOModeAuto,
		Logger: newTestLogger(t), Version: "test", Server: kernel, Host: fakeHost{}}}
}

// start runs a daemon of the env.
func (e *runEnv) start() *daemonRun {
	e.t.Helper()
	return startRun(e.t, e.cfg)
}

// exit is the end of the process of a daemon that has returned from
// Run: its devices wait in the kernel (fakeKernel.exit), and the locks
// its open files hold go. Leave keeps those files open for the process's
// last moments, so the test drops their flocks (storage.File locks a
// regular file) without closing them: the daemon's objects still own the
// descriptors.
func (e *runEnv) exit() {
	e.t.Helper()
	e.kernel.exit()
	dir, err := filepath.EvalSymlinks(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		n, nerr := strconv.Atoi(fd.Name())
		if err == nil && nerr == nil && strings.HasPrefix(target, dir+"/") {
			unix.Flock(n, unix.LOCK_UN) // a descriptor that takes no flock (O_PATH) holds none
		}
	}
}

// backing creates a 4 MiB file to attach.
func (e *runEnv) backing(name string) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, make([]byte, 4<<20), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// exportSnapshot attaches a backing file through c, takes a snapshot of
// it and exports its image on a unix socket; it returns the device, the
// snapshot and the export's listen address.
func (e *runEnv) exportSnapshot(c *api.Client) (api.Device, api.Snapshot, string) {
	e.t.Helper()
	ctx := context.Background()
	dev, err := c.Attach(ctx, api.AttachRequest{Backing: e.backing("a.img")})
	if err != nil {
		e.t.Fatal(err)
	}
	s, err := c.CreateSnapshot(ctx, api.CreateSnapshotRequest{Devices: []string{dev.Path}, Storage: filepath.Join(e.dir, "diff"), Limit: 8 << 20})
	if err == nil {
		s, err = c.Take(ctx, s.ID)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	listen := "unix:" + filepath.Join(e.dir, "nbd.sock")
	if _, err := c.StartExport(ctx, api.ExportRequest{Snapshot: s.ID, Listen: listen}); err != nil {
		e.t.Fatal(err)
	}
	return dev, s, listen
}

// nbdGreeting connects to the NBD server on unix socket p and returns the
// first word it sends.
func nbdGreeting(p string) (string, error) {
	conn, err := net.Dial("unix", p)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	buf := make([]byte, 8)
	_, err = io.ReadFull(conn, buf)
	return string(buf), err
}

// A planned stop (the context ends) leaves the filtered device served
// and records it, with its taken snapshot and its export, beside the
// socket; the next Run on the socket serves all three again, on the same
// node and listener.
func TestRunRestartServesDevicesSnapshotsAndExportsAgain(t *testing.T) {
	e := newRunEnv(t)
	ctx := context.Background()
	first := e.start()
	dev, s, listen := e.exportSnapshot(first.client)

	first.stop()
	if err := first.wait(); err != nil {
		t.Fatalf("Run after its context ended: %v, want nil", err)
	}
	statePath := snapshot.StatePathFor(e.cfg.Socket)
	if data, err := os.ReadFile(statePath); err != nil || !strings.Contains(string(data), dev.Backing) {
		t.Errorf("state file %s after the planned stop: %v, %q; want the attached device recorded", statePath, err, data)
	}
	exportsPath := snapshot.BesideSocket(e.cfg.Socket, "exports")
	var saved []export.Saved
	if data, err := os.ReadFile(exportsPath); err != nil {
		t.Errorf("exports file after the planned stop: %v", err)
	} else if err := json.Unmarshal(data, &saved); err != nil || len(saved) != 1 || saved[0].Snapshot != s.ID || saved[0].Options.Listen != listen {
		t.Errorf("saved exports %s: %+v, %v; want the export of %s on %s", data, saved, err, s.ID, listen)
	}
	if st := e.kernel.states(); st[0] != ublk.StateLive {
		t.Errorf("kernel devices after the planned stop: %v, want the filtered device 0 still live", st)
	}

	e.exit()
	c := e.start().client
	if n := e.kernel.handedOver(); n != 1 {
		t.Errorf("the second daemon recovered %d devices, want 1", n)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Devices) != 1 || st.Devices[0].Path != dev.Path || len(st.Unrecovered) != 0 {
		t.Errorf("devices after the restart: %+v, unrecovered %+v; want %s served again", st.Devices, st.Unrecovered, dev.Path)
	}
	if got, err := c.Snapshot(ctx, s.ID); err != nil || got.State != api.StateTaken || got.Devices[0].Image == "" {
		t.Errorf("snapshot after the restart: %+v, %v; want it taken, with its image", got, err)
	}
	exps, err := c.Exports(ctx)
	if err != nil || len(exps) != 1 || exps[0].Listen != listen || exps[0].Snapshot != s.ID {
		t.Errorf("exports after the restart: %+v, %v; want the export of %s on %s", exps, err, s.ID, listen)
	}
	if greeting, err := nbdGreeting(strings.TrimPrefix(listen, "unix:")); err != nil || greeting != "NBDMAGIC" {
		t.Errorf("the export after the restart greets with %q, %v; want NBDMAGIC", greeting, err)
	}
	if _, err := os.Stat(exportsPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("exports file after the restart: %v, want it taken", err)
	}
}

// A shutdown request ends Run for good: the images, the filtered devices
// and the export stop, and the next Run finds nothing to recover.
func TestRunShutdownStopsForGood(t *testing.T) {
	e := newRunEnv(t)
	ctx := context.Background()
	first := e.start()
	_, _, listen := e.exportSnapshot(first.client)
	nbdSock := strings.TrimPrefix(listen, "unix:")

	if err := first.client.Shutdown(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := first.wait(); err != nil {
		t.Fatalf("Run after shutdown: %v, want nil", err)
	}
	if st := e.kernel.states(); len(st) != 0 {
		t.Errorf("kernel devices after shutdown: %v, want none", st)
	}
	if _, err := os.Stat(nbdSock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("export socket after shutdown: %v, want it removed", err)
	}
	if _, err := os.Stat(snapshot.BesideSocket(e.cfg.Socket, "exports")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("exports file after shutdown: %v, want none", err)
	}

	e.exit()
	next := e.start()
	st, err := next.client.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Devices) != 0 || len(st.Snapshots) != 0 || len(st.Unrecovered) != 0 || e.kernel.handedOver() != 0 {
		t.Errorf("the daemon after a shutdown found %+v and recovered %d devices, want nothing", st, e.kernel.handedOver())
	}
	if exps, err := next.client.Exports(ctx); err != nil || len(exps) != 0 {
		t.Errorf("exports of the daemon after a shutdown: %+v, %v; want none", exps, err)
	}
}

// Run fails where it cannot listen: a socket whose
// directory cannot be made, or one another daemon listens on.
func TestRunFailsWhereItCannotListen(t *testing.T) {
	e := newRunEnv(t)
	notDir := filepath.Join(e.dir, "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := e.cfg
	cfg.Socket = filepath.Join(notDir, "ublksnap.sock")
	if err := Run(context.Background(), cfg); !errors.Is(err, syscall.ENOTDIR) {
		t.Errorf("Run on %s: %v, want ENOTDIR", cfg.Socket, err)
	}

	running := e.start()
	if err := Run(context.Background(), e.cfg); !errors.Is(err, ErrRunning) {
		t.Errorf("a second Run on %s: %v, want ErrRunning", e.cfg.Socket, err)
	}
	if _, err := running.client.Status(context.Background()); err != nil {
		t.Errorf("the first daemon after the second failed: %v", err)
	}
}

// The devices file's devices are attached before the daemon answers; a
// line with a mistake or a missing backing is reported in status with
// its line and keeps none of the others down; after a restart the
// recovered device is not attached a second time.
func TestRunAttachesDeclaredDevices(t *testing.T) {
	e := newRunEnv(t)
	ctx := context.Background()
	a, b := e.backing("a.img"), e.backing("b.img")
	conf := filepath.Join(e.dir, "devices.conf")
	text := "# declared\n" +
		"a " + a + " queues=1\n" +
		"typo " + b + " qeues=1\n" +
		"gone " + filepath.Join(e.dir, "missing.img") + "\n" +
		"b " + b + "\n" +
		"a " + b + "\n"
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	e.cfg.DevicesFile = conf
	check := func(r *daemonRun) map[string]string {
		t.Helper()
		st, err := r.client.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		served := map[string]string{}
		for _, d := range st.Devices {
			served[d.Name] = d.Backing
		}
		if len(served) != 2 || served["a"] != a || served["b"] != b {
			t.Fatalf("devices %+v, want a over %s and b over %s", st.Devices, a, b)
		}
		failed := map[string]string{}
		for _, d := range st.Declared {
			if d.Device == "" {
				failed[d.Source] = d.Error
			}
		}
		want := map[int]string{3: "unknown key", 4: "no such file", 6: "already declared on line 2"}
		if len(failed) != len(want) {
			t.Fatalf("declared but not attached: %v, want lines 3, 4 and 6", failed)
		}
		for line, msg := range want {
			if got := failed[fmt.Sprintf("%s:%d", conf, line)]; !strings.Contains(got, msg) {
				t.Errorf("line %d: %q, want %q", line, got, msg)
			}
		}
		return served
	}
	first := e.start()
	check(first)
	first.stop()
	if err := first.wait(); err != nil {
		t.Fatal(err)
	}
	e.exit()
	second := e.start()
	check(second)
	if n := len(e.kernel.states()); n != 2 {
		t.Fatalf("%d devices in the kernel after the restart, want the 2 declared ones, recovered", n)
	}
}
