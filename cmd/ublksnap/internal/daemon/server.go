// Package daemon is the ublksnap daemon: its lifecycle and its transport.
// The state and its rules live in package snapshot; package main only
// parses the flags and wires them.
//
// Run is one daemon's life on its socket: it listens (Listen: one daemon
// a socket), recovers what an earlier daemon on the same socket left
// (snapshot.Manager.Recover: its filtered devices and saved snapshots),
// starts again the exports it saved (ResumeExports), and serves. Its end
// is either a restart (its context ends: the exports are saved beside the
// socket and the devices left to the next daemon, snapshot.Manager.Leave)
// or a stop for good (an accepted shutdown request: snapshot.Manager.Close).
// What changes the process itself, and needs root, is its caller's, before
// Run (process.go): the re-execution in a mount namespace of its own,
// HardenProcess and DropUblkMounts.
//
// The transport serves the api package's protocol on the unix socket over
// a Service (a snapshot.Manager) and the NBD exports (package export),
// and maps domain types and errors to the wire.
//
// Errors keep their errno on the wire (api.Error.Errno) and choose the
// status: EINVAL → 400, EPERM/EACCES → 403, ENOENT/ENODEV → 404,
// EBUSY/EEXIST/EALREADY → 409, ENOSPC → 507, ENOTRECOVERABLE (a snapshot
// lost with an earlier daemon) → 410, anything else → 500.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/internal/caller"
	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/storage"
)

// ErrRunning is returned by Listen when a daemon already answers on the socket.
var ErrRunning = errors.New("a ublksnap daemon is already running")

// maxEventWait bounds one wait-event request.
const maxEventWait = time.Hour

// Service is what the daemon serves: snapshot.Manager's methods.
type Service interface {
	Status(ctx context.Context) snapshot.Status
	Attach(ctx context.Context, opt snapshot.AttachOptions) (snapshot.DeviceInfo, error)
	Detach(ctx context.Context, device string, force bool) error
	Snapshots(ctx context.Context) []string
	CreateSnapshot(ctx context.Context, opt snapshot.CreateOptions) (snapshot.SnapshotInfo, error)
	Snapshot(ctx context.Context, id string) (snapshot.SnapshotInfo, error)
	AddDevice(ctx context.Context, id, device string) (snapshot.SnapshotInfo, error)
	AppendStorage(ctx context.Context, id, path string, ranges []storage.Range) (snapshot.SnapshotInfo, error)
	Take(ctx context.Context, id string) (snapshot.SnapshotInfo, error)
	WaitEvent(ctx context.Context, id string, timeout time.Duration) (storage.Event, error)
	Destroy(ctx context.Context, id string, force bool) error
	DeviceState(ctx context.Context, device string) (snapshot.DeviceState, error)
	Shutdown(ctx context.Context, force bool) error
	CBTInfo(device string) (cbt.Info, error)
	CBTMap(device string) ([]byte, cbt.Info, error)
	MarkDirty(device string, ranges []cbt.Extent) error
	OpenImages(id, device string) ([]*snapshot.ImageReader, error)
}

var _ Service = (*snapshot.Manager)(nil)

// NewServer returns the HTTP server of the protocol over svc, whose NBD
// exports are run by exports. Requests
// resolve the paths they name in their caller's view of the filesystem
// (caller.With with the caller's /proc/PID, found with
// SO_PEERCRED), and end when ctx ends.
func NewServer(ctx context.Context, svc Service, exports *export.Exports, version string, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           NewHandler(svc, exports, version, log),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ConnContext:       callerContext,
	}
}

// callerContext adds the caller's root to a connection's context.
func callerContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) {
		cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cred == nil {
		return ctx
	}
	ctx = context.WithValue(ctx, peerUIDKey{}, cred.Uid)
	if cred.Pid <= 0 {
		return ctx
	}
	return caller.With(ctx, caller.FromPID(int(cred.Pid)))
}

// peerUIDKey is the context key of the user id of a connection's peer.
type peerUIDKey struct{}

// rootOnly lets through requests whose peer is root (uid 0, from
// SO_PEERCRED) and answers 403 to anyone else or to a peer not known.
func rootOnly(next http.HandlerFunc, log *slog.Logger) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if uid, ok := r.Context().Value(peerUIDKey{}).(uint32); !ok || uid != 0 {
			writeError(w, r, fmt.Errorf("%s is for root only: %w", r.URL.Path, syscall.EPERM), log)
			return
		}
		next(w, r)
	}
}

// NewHandler returns the HTTP handler of the protocol over svc and exports.
func NewHandler(svc Service, exports *export.Exports, version string, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	h := func(pattern string, fn func(r *http.Request) (any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			out, err := fn(r)
			if err != nil {
				writeError(w, r, err, log)
				return
			}
			writeJSON(w, http.StatusOK, out)
		})
	}
	h("GET /v1/status", func(r *http.Request) (any, error) {
		return statusToWire(svc.Status(r.Context()), version), nil
	})
	h("POST /v1/devices", func(r *http.Request) (any, error) {
		var req api.AttachRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		d, err := svc.Attach(r.Context(), snapshot.AttachOptions{Backing: req.Backing, Name: req.Name, Queues: req.Queues, Depth: req.Depth, IOMode: req.IOMode})
		return deviceToWire(d), err
	})
	h("DELETE /v1/devices", func(r *http.Request) (any, error) {
		force, err := boolParam(r, "force")
		if err != nil {
			return nil, err
		}
		return struct{}{}, svc.Detach(r.Context(), r.URL.Query().Get("device"), force)
	})
	h("POST /v1/shutdown", func(r *http.Request) (any, error) {
		force, err := boolParam(r, "force")
		if err != nil {
			return nil, err
		}
		return struct{}{}, svc.Shutdown(r.Context(), force)
	})
	h("GET /v1/snapshots", func(r *http.Request) (any, error) { return svc.Snapshots(r.Context()), nil })
	h("POST /v1/snapshots", func(r *http.Request) (any, error) {
		var req api.CreateSnapshotRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		if req.Limit > 1<<62 {
			return nil, fmt.Errorf("limit %d bytes is beyond any device: %w", req.Limit, syscall.EINVAL)
		}
		return snapshotToWire(svc.CreateSnapshot(r.Context(), snapshot.CreateOptions{
			Devices: req.Devices, Storage: req.Storage, Limit: int64(req.Limit), Force: req.Force}))
	})
	h("GET /v1/snapshots/{id}", func(r *http.Request) (any, error) {
		return snapshotToWire(svc.Snapshot(r.Context(), r.PathValue("id")))
	})
	h("DELETE /v1/snapshots/{id}", func(r *http.Request) (any, error) {
		force, err := boolParam(r, "force")
		if err != nil {
			return nil, err
		}
		return struct{}{}, svc.Destroy(r.Context(), r.PathValue("id"), force)
	})
	h("POST /v1/snapshots/{id}/devices", func(r *http.Request) (any, error) {
		var req api.AddDeviceRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return snapshotToWire(svc.AddDevice(r.Context(), r.PathValue("id"), req.Device))
	})
	h("POST /v1/snapshots/{id}/storage", func(r *http.Request) (any, error) {
		var req api.AppendStorageRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return snapshotToWire(svc.AppendStorage(r.Context(), r.PathValue("id"), req.Path, req.Ranges))
	})
	h("POST /v1/snapshots/{id}/take", func(r *http.Request) (any, error) {
		return snapshotToWire(svc.Take(r.Context(), r.PathValue("id")))
	})
	h("GET /v1/snapshots/{id}/event", func(r *http.Request) (any, error) {
		ms, err := strconv.ParseInt(r.URL.Query().Get("timeout_ms"), 10, 64)
		if err != nil || ms < 0 {
			return nil, fmt.Errorf("timeout_ms must be a whole number of milliseconds, got %q: %w", r.URL.Query().Get("timeout_ms"), syscall.EINVAL)
		}
		e, err := svc.WaitEvent(r.Context(), r.PathValue("id"), min(time.Duration(ms)*time.Millisecond, maxEventWait))
		if errors.Is(err, storage.ErrTimeout) {
			return api.Event{Code: api.EventTimeout}, nil
		}
		return eventToWire(e), err
	})
	h("GET /v1/snapshot-info", func(r *http.Request) (any, error) {
		st, err := svc.DeviceState(r.Context(), r.URL.Query().Get("device"))
		return api.SnapshotInfo{Device: st.Device, Snapshot: st.Snapshot, State: string(st.State), Image: st.Image, ErrorCode: -int(st.Errno)}, err
	})
	h("GET /v1/cbt", func(r *http.Request) (any, error) {
		dev := r.URL.Query().Get("device")
		i, err := svc.CBTInfo(dev)
		return cbtInfoToWire(dev, i), err
	})
	h("GET /v1/cbt/map", func(r *http.Request) (any, error) {
		dev := r.URL.Query().Get("device")
		m, i, err := svc.CBTMap(dev)
		return api.CBTMap{CBTInfo: cbtInfoToWire(dev, i), Map: m}, err
	})
	h("POST /v1/cbt/dirty", func(r *http.Request) (any, error) {
		var req api.MarkDirtyRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return struct{}{}, svc.MarkDirty(req.Device, req.Ranges)
	})
	h("POST /v1/exports", func(r *http.Request) (any, error) {
		var req api.ExportRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		images, err := svc.OpenImages(req.Snapshot, req.Device)
		if err != nil {
			return nil, err
		}
		var names map[string]string
		if req.Name != "" {
			if len(images) != 1 {
				return nil, fmt.Errorf("a name is for one image, and snapshot %s has %d: give the device too: %w", req.Snapshot, len(images), syscall.EINVAL)
			}
			names = map[string]string{images[0].Device: req.Name}
		}
		info, err := exports.Start(r.Context(), req.Snapshot, exportMembers(images, names), export.Options{Listen: req.Listen, AllowRemote: req.AllowRemote})
		return exportToWire(info), err
	})
	h("GET /v1/exports", func(r *http.Request) (any, error) {
		out := []api.Export{}
		for _, info := range exports.List() {
			out = append(out, exportToWire(info))
		}
		return out, nil
	})
	h("DELETE /v1/exports", func(r *http.Request) (any, error) {
		return struct{}{}, exports.Stop(r.URL.Query().Get("listen"))
	})
	// Go's profiler, for profiles of a real run (root only): for example
	// curl --unix-socket SOCK 'http://ublksnap/debug/pprof/profile?seconds=10'.
	mux.HandleFunc("GET /debug/pprof/", rootOnly(pprof.Index, log))
	mux.HandleFunc("GET /debug/pprof/cmdline", rootOnly(pprof.Cmdline, log))
	mux.HandleFunc("GET /debug/pprof/profile", rootOnly(pprof.Profile, log))
	mux.HandleFunc("GET /debug/pprof/symbol", rootOnly(pprof.Symbol, log))
	mux.HandleFunc("GET /debug/pprof/trace", rootOnly(pprof.Trace, log))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, fmt.Errorf("no endpoint %s %s: %w", r.Method, r.URL.Path, syscall.ENOENT), log)
	})
	return mux
}

// decode reads one JSON value, refusing unknown fields and trailing data.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request body: %v: %w", err, syscall.EINVAL)
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); err != io.EOF {
		return fmt.Errorf("request body: data after the JSON value: %w", syscall.EINVAL)
	}
	return nil
}

func boolParam(r *http.Request, name string) (bool, error) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(s)
	if err != nil {
		return false, fmt.Errorf("%s must be true or false, got %q: %w", name, s, syscall.EINVAL)
	}
	return b, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v) //nolint:errcheck // the client went away; nothing to do
}

// wireError maps an error to its wire form by its errno.
func wireError(err error) api.Error {
	errno := snapshot.Errno(err)
	e := api.Error{Status: http.StatusInternalServerError, Code: api.CodeInternal, Message: err.Error(), Errno: int(errno)}
	switch errno {
	case syscall.EINVAL, syscall.ERANGE, syscall.ENOTBLK, syscall.EISDIR, syscall.ENOTDIR, syscall.ENAMETOOLONG:
		e.Status, e.Code = http.StatusBadRequest, api.CodeBadRequest
	case syscall.EPERM, syscall.EACCES, syscall.EROFS:
		e.Status, e.Code = http.StatusForbidden, api.CodeForbidden
	case syscall.ENOENT, syscall.ENODEV, syscall.ENXIO:
		e.Status, e.Code = http.StatusNotFound, api.CodeNotFound
	case syscall.EBUSY, syscall.EEXIST, syscall.EALREADY, syscall.EAGAIN, syscall.ETXTBSY:
		e.Status, e.Code = http.StatusConflict, api.CodeConflict
	case syscall.ENOSPC:
		e.Status, e.Code = http.StatusInsufficientStorage, api.CodeNoSpace
	case syscall.ENOTRECOVERABLE:
		e.Status, e.Code = http.StatusGone, api.CodeLost
	}
	return e
}

func writeError(w http.ResponseWriter, r *http.Request, err error, log *slog.Logger) {
	e := wireError(err)
	log.Info("request failed", "method", r.Method, "path", r.URL.Path, "status", e.Status, "errno", e.Errno, "err", err)
	writeJSON(w, e.Status, e)
}

// Listen opens the daemon's unix socket, creating its directory. The
// socket is created with mode 0600 (under a umask of 177, so it never
// exists with wider permissions); Listen must be called before the
// daemon creates other files. A lock on SOCKET.lock, held until the
// Listener is closed, makes a second daemon on the same socket fail with
// ErrRunning; a stale socket file left by a daemon that died is replaced.
func Listen(socket string) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	lock, err := os.OpenFile(socket+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock file: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w on %s", ErrRunning, socket)
		}
		return nil, fmt.Errorf("lock %s.lock: %w", socket, err)
	}
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		lock.Close()
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	old := unix.Umask(0o177)
	l, err := net.Listen("unix", socket)
	unix.Umask(old)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("listen on %s: %w", socket, err)
	}
	return &Listener{Listener: l, lock: lock}, nil
}

// Listener is the daemon's socket and the lock that makes it the only
// daemon on it. Serving on the embedded net.Listener alone lets the
// server close the socket at its shutdown while the lock stays held
// until the daemon has left or stopped its devices.
type Listener struct {
	net.Listener
	lock *os.File // holds the flock until Close
}

// Close closes the socket and releases the lock.
func (l *Listener) Close() error {
	err := l.Listener.Close()
	l.lock.Close()
	return err
}
