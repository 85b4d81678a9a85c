// Package export serves the images of taken snapshots over NBD (package
// nbd) to backup tools: qemu-img, nbdcopy, nbdinfo, libnbd scripts.
//
// Each Start opens one listener (a unix socket, or TCP on loopback unless
// remote clients are allowed) with one read-only export per image. Every
// export offers two kinds of metadata context: base:allocation, which
// reports as holes (reading as zeros) the holes of the original's backing
// file in chunks the snapshot never copied, so that clients skip them, and
// qemu:dirty-bitmap:since-GENERATION-N, the blocks whose change tracking
// number is above N: what changed since the take whose point was
// GENERATION:N, as `ublksnap cbt changes --since` reports it. Any N up to
// the device's changes number is served while the generation lasts;
// LIST_META_CONTEXT shows the one for the previous take. A point of
// another generation gets no context, so a client falls back to a full
// copy.
//
// An export ends with Stop, when its snapshot goes away, or when the
// Exports close; its unix socket is removed then. Across a planned restart
// of the daemon, which keeps the snapshots, Saved describes the exports
// and the next daemon starts them again where they were (see Saved).
package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/internal/atomicfile"
	"github.com/ublksnap/ublksnap/internal/caller"
	"github.com/ublksnap/ublksnap/nbd"
	"github.com/ublksnap/ublksnap/storage"
)

// Image is what an export serves: a snapshot image (the daemon gives
// snapshot.ImageReader).
type Image interface {
	ReadAt(p []byte, off int64) (int, error)
	Tracking() cbt.Info
	Changed(since cbt.Point, off, length int64, maxRuns int) ([]cbt.Run, error)
	Allocation(off, length int64, maxSpans int) ([]storage.Span, error)
	Ended() <-chan struct{}
}

// Member describes one image to export.
type Member struct {
	Name   string `json:"name"`   // export name
	Device string `json:"device"` // the original device
	Size   int64  `json:"size"`   // bytes
	// Bitmap is the dirty bitmap context of the changes since the
	// previous take (set by Start; empty before the device's first take).
	Bitmap string `json:"bitmap,omitempty"`
	Image  Image  `json:"-"`
}

// Options describe one listener.
type Options struct {
	// Listen is unix:PATH (an absolute path, in the caller's view; it
	// must not exist) or tcp:HOST:PORT.
	Listen string `json:"listen"`
	// AllowRemote allows a TCP address that is not loopback. NBD here
	// has neither TLS nor authentication.
	AllowRemote bool `json:"allow_remote,omitempty"`
}

// Saved is what starts an export again in the next daemon after a planned
// restart: the same snapshot, members and names on the same listener.
type Saved struct {
	Snapshot string `json:"snapshot"`
	// Options.Listen is in the daemon's own view, with the TCP port
	// that was bound.
	Options Options `json:"options"`
	// Names are the export names by original device.
	Names map[string]string `json:"names"`
}

// Info describes a running export.
type Info struct {
	Listen   string   `json:"listen"`  // as given
	Address  string   `json:"address"` // where clients connect (TCP: the port bound)
	Snapshot string   `json:"snapshot"`
	Members  []Member `json:"exports"`
}

// ErrExists reports a listener already in use by an export.
var ErrExists = fmt.Errorf("export: already exporting there: %w", syscall.EEXIST)

// Exports are the running exports of a daemon.
type Exports struct {
	log *slog.Logger // immutable

	mu      sync.Mutex
	running map[string]*running // by Options.Listen; guarded by mu
	closed  bool                // guarded by mu
}

// running is one listener and its server.
type running struct {
	info     Info
	saved    *Saved // to start it again; nil when the next daemon could not listen there
	srv      *nbd.Server
	stop     chan struct{} // closed (once, by end) to end the export
	stopOnce sync.Once
	stopped  chan struct{} // closed once the server is closed and the socket removed
}

// New returns an empty set of exports.
func New(log *slog.Logger) *Exports {
	return &Exports{log: log, running: map[string]*running{}}
}

// Start serves members of snapshot id on opt.Listen until Stop, the end
// of the snapshot, or Close.
func (e *Exports) Start(ctx context.Context, id string, members []Member, opt Options) (Info, error) {
	fail := func(err error) (Info, error) {
		return Info{}, fmt.Errorf("export snapshot %s on %s: %w", id, opt.Listen, err)
	}
	if len(members) == 0 {
		return fail(fmt.Errorf("nothing to export: %w", syscall.EINVAL))
	}
	info := Info{Listen: opt.Listen, Snapshot: id, Members: slices.Clone(members)}
	var exports []*nbd.Export
	for i, m := range info.Members {
		x := nbdExport(id, m)
		if len(x.Contexts) > 1 {
			info.Members[i].Bitmap = x.Contexts[1]
		}
		exports = append(exports, x)
	}
	srv, err := nbd.NewServer(exports, nbd.Options{Logger: e.log})
	if err != nil {
		return fail(fmt.Errorf("%w: %w", err, syscall.EINVAL))
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return fail(net.ErrClosed)
	}
	if e.running[opt.Listen] != nil {
		return fail(ErrExists)
	}
	l, cleanup, again, err := listen(ctx, opt)
	if err != nil {
		return fail(err)
	}
	info.Address = opt.Listen
	if tl, ok := l.(*net.TCPListener); ok {
		info.Address = "tcp:" + tl.Addr().String()
		again = info.Address
	}
	r := &running{info: info, srv: srv, stop: make(chan struct{}), stopped: make(chan struct{})}
	if again != "" {
		r.saved = &Saved{Snapshot: id, Options: Options{Listen: again, AllowRemote: opt.AllowRemote}, Names: map[string]string{}}
		for _, m := range members {
			r.saved.Names[m.Device] = m.Name
		}
	}
	e.running[opt.Listen] = r
	go srv.Serve(l)
	go func() {
		why := "stopped"
		select {
		case <-r.stop:
		case <-members[0].Image.Ended():
			why = "the snapshot ended"
		}
		srv.Close()
		cleanup()
		e.mu.Lock()
		delete(e.running, opt.Listen)
		e.mu.Unlock()
		close(r.stopped)
		e.log.Info("export ended", "listen", opt.Listen, "snapshot", id, "why", why)
	}()
	e.log.Info("exporting over NBD", "listen", info.Address, "snapshot", id, "exports", len(members))
	return info, nil
}

// Stop ends the export on listen and waits until its clients are gone.
func (e *Exports) Stop(listen string) error {
	e.mu.Lock()
	r := e.running[listen]
	e.mu.Unlock()
	if r == nil {
		return fmt.Errorf("export on %s: no such export: %w", listen, syscall.ENOENT)
	}
	r.end()
	return nil
}

// end ends the export and waits until it has ended.
func (r *running) end() {
	r.stopOnce.Do(func() { close(r.stop) })
	<-r.stopped
}

// List describes the running exports.
func (e *Exports) List() []Info {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []Info{}
	for _, r := range e.running {
		out = append(out, r.info)
	}
	return out
}

// Saved describes the running exports for the next daemon, leaving out
// (with a log line) those it could not listen for: a unix socket in a
// directory the daemon's own mount namespace does not see.
func (e *Exports) Saved() []Saved {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []Saved
	for _, r := range e.running {
		if r.saved == nil {
			e.log.Warn("export will not be started again after the restart: the daemon does not see its socket's directory", "listen", r.info.Listen, "snapshot", r.info.Snapshot)
			continue
		}
		out = append(out, *r.saved)
	}
	return out
}

// WriteSaved writes saved to path, replacing it atomically.
func WriteSaved(path string, saved []Saved) error {
	b, err := json.Marshal(saved)
	if err == nil {
		err = atomicfile.WriteFile(path, b, 0o600)
	}
	if err != nil {
		return fmt.Errorf("save the exports for the next daemon: %w", err)
	}
	return nil
}

// TakeSaved reads and removes what WriteSaved wrote to path; nothing when
// there is no such file.
func TakeSaved(path string) ([]Saved, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err == nil {
		err = os.Remove(path)
	}
	var saved []Saved
	if err == nil {
		err = json.Unmarshal(b, &saved)
	}
	if err != nil {
		return nil, fmt.Errorf("exports saved by an earlier daemon in %s: %w", path, err)
	}
	return saved, nil
}

// Close ends every export.
func (e *Exports) Close() {
	e.mu.Lock()
	e.closed = true
	var all []*running
	for _, r := range e.running {
		all = append(all, r)
	}
	e.mu.Unlock()
	for _, r := range all {
		r.end()
	}
}

// listen opens the listener of opt and returns the function that removes
// what it created and, for a unix socket, its address in this process's
// view ("" when it has none there).
func listen(ctx context.Context, opt Options) (l net.Listener, cleanup func(), again string, err error) {
	kind, addr, _ := strings.Cut(opt.Listen, ":")
	switch kind {
	case "unix":
		return listenUnix(ctx, addr)
	case "tcp":
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, nil, "", fmt.Errorf("%w: %w", err, syscall.EINVAL)
		}
		if !opt.AllowRemote && !isLoopback(host) {
			return nil, nil, "", fmt.Errorf("%s is not a loopback address and NBD here has neither TLS nor authentication; allow remote clients explicitly: %w", host, syscall.EPERM)
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, "", err
		}
		return l, func() {}, "", nil
	}
	return nil, nil, "", fmt.Errorf("listen address %q: want unix:PATH or tcp:HOST:PORT: %w", opt.Listen, syscall.EINVAL)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// listenUnix binds a socket at path p of the caller of ctx. The socket is
// made through a handle on its directory, which stays valid after the
// caller (whose /proc/PID/root leads there) is gone, so that it can be
// removed then. It also returns unix:p when p names the same directory
// in this process's own view, where a later daemon can bind it again.
func listenUnix(ctx context.Context, p string) (net.Listener, func(), string, error) {
	open, err := caller.Path(ctx, p)
	if err != nil {
		return nil, nil, "", err
	}
	dir, err := os.OpenFile(filepath.Dir(open), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, "", fmt.Errorf("directory of %s: %w", p, err)
	}
	base := filepath.Base(open)
	if err := unix.Fstatat(int(dir.Fd()), base, new(unix.Stat_t), unix.AT_SYMLINK_NOFOLLOW); err == nil {
		dir.Close()
		return nil, nil, "", fmt.Errorf("%s exists; remove it or choose another path: %w", p, syscall.EEXIST)
	}
	via := fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), base)
	l, err := net.Listen("unix", via)
	if err != nil {
		dir.Close()
		return nil, nil, "", err
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false) // the path through /proc/self/fd dies with dir
	if err := unix.Fchmodat(int(dir.Fd()), base, 0o600, 0); err != nil {
		l.Close()
		unix.Unlinkat(int(dir.Fd()), base, 0)
		dir.Close()
		return nil, nil, "", err
	}
	again := ""
	var there, here unix.Stat_t
	clean := filepath.Clean(p)
	if unix.Fstat(int(dir.Fd()), &there) == nil && unix.Stat(filepath.Dir(clean), &here) == nil &&
		there.Dev == here.Dev && there.Ino == here.Ino {
		again = "unix:" + clean
	}
	return l, func() {
		unix.Unlinkat(int(dir.Fd()), base, 0)
		dir.Close()
	}, again, nil
}

// BitmapPrefix starts the names of the dirty bitmap contexts.
const BitmapPrefix = "qemu:dirty-bitmap:since-"

// BitmapName names the context of the blocks changed since point p.
func BitmapName(p cbt.Point) string {
	return BitmapPrefix + p.Generation.String() + "-" + strconv.Itoa(int(p.Changes))
}

// parseBitmapName reverses BitmapName.
func parseBitmapName(name string) (cbt.Point, bool) {
	rest, ok := strings.CutPrefix(name, BitmapPrefix)
	i := strings.LastIndexByte(rest, '-')
	if !ok || i < 0 {
		return cbt.Point{}, false
	}
	p, err := cbt.ParsePoint(rest[:i] + ":" + rest[i+1:])
	return p, err == nil
}

// maxRuns bounds the extents of one BLOCK_STATUS reply of a bitmap.
const maxRuns = 1 << 16

// nbdExport is the NBD export of member m of snapshot id.
func nbdExport(id string, m Member) *nbd.Export {
	img := m.Image
	x := &nbd.Export{Name: m.Name, Description: fmt.Sprintf("snapshot %s of %s", id, m.Device), Size: m.Size, Data: img,
		Contexts: []string{nbd.BaseAllocation}}
	if t := img.Tracking(); t.Changes > 0 {
		x.Contexts = append(x.Contexts, BitmapName(cbt.Point{Generation: t.Generation, Changes: t.Changes - 1}))
	}
	x.Context = func(name string) nbd.MetaContext {
		if name == nbd.BaseAllocation {
			return func(off, length int64) ([]nbd.Extent, error) {
				spans, err := img.Allocation(off, length, maxRuns)
				ext := make([]nbd.Extent, len(spans))
				for i, s := range spans {
					ext[i].Length = s.Length
					if s.Hole {
						ext[i].Flags = nbd.StateHole | nbd.StateZero
					}
				}
				return ext, err
			}
		}
		p, ok := parseBitmapName(name)
		if t := img.Tracking(); !ok || p.Generation != t.Generation || p.Changes > t.Changes {
			return nil
		}
		return func(off, length int64) ([]nbd.Extent, error) {
			runs, err := img.Changed(p, off, length, maxRuns)
			if errors.Is(err, cbt.ErrOtherGeneration) {
				err = fmt.Errorf("the change tracking of %s started a new generation: %w", m.Device, err)
			}
			ext := make([]nbd.Extent, len(runs))
			for i, r := range runs {
				ext[i].Length = r.Length
				if r.Changed {
					ext[i].Flags = nbd.StateDirty
				}
			}
			return ext, err
		}
	}
	return x
}
