// Package daemon is the ublksnap daemon: it owns every filtered device and
// snapshot and serves the api package's protocol on a unix socket.
//
// The HTTP layer (this file) only decodes requests, calls a Service and
// maps its errors to statuses: ErrInvalid → 400, ErrNotFound → 404,
// ErrConflict → 409, anything else → 500. The Service holds the state.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

// Sentinel errors a Service wraps so that callers get the right status.
var (
	ErrInvalid  = errors.New("invalid request")
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
	// ErrRunning is returned by Listen when a daemon already answers on the socket.
	ErrRunning = errors.New("a ublksnap daemon is already running")
)

// maxEventWait bounds one wait-event request.
const maxEventWait = time.Hour

// Service is what the daemon does; the HTTP layer calls it.
type Service interface {
	Status(ctx context.Context) (api.Status, error)
	Attach(ctx context.Context, req api.AttachRequest) (api.Device, error)
	Detach(ctx context.Context, device string) error
	Snapshots(ctx context.Context) ([]string, error)
	CreateSnapshot(ctx context.Context, req api.CreateSnapshotRequest) (api.Snapshot, error)
	Snapshot(ctx context.Context, id string) (api.Snapshot, error)
	AddDevice(ctx context.Context, id, device string) (api.Snapshot, error)
	AppendStorage(ctx context.Context, id string, req api.AppendStorageRequest) (api.Snapshot, error)
	Take(ctx context.Context, id string) (api.Snapshot, error)
	WaitEvent(ctx context.Context, id string, timeout time.Duration) (api.Event, error)
	Destroy(ctx context.Context, id string, force bool) error
	SnapshotInfo(ctx context.Context, device string) (api.SnapshotInfo, error)
}

// NewHandler returns the HTTP handler of the protocol over svc.
func NewHandler(svc Service, log *slog.Logger) http.Handler {
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
	h("GET /v1/status", func(r *http.Request) (any, error) { return svc.Status(r.Context()) })
	h("POST /v1/devices", func(r *http.Request) (any, error) {
		var req api.AttachRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return svc.Attach(r.Context(), req)
	})
	h("DELETE /v1/devices", func(r *http.Request) (any, error) {
		return struct{}{}, svc.Detach(r.Context(), r.URL.Query().Get("device"))
	})
	h("GET /v1/snapshots", func(r *http.Request) (any, error) { return svc.Snapshots(r.Context()) })
	h("POST /v1/snapshots", func(r *http.Request) (any, error) {
		var req api.CreateSnapshotRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return svc.CreateSnapshot(r.Context(), req)
	})
	h("GET /v1/snapshots/{id}", func(r *http.Request) (any, error) {
		return svc.Snapshot(r.Context(), r.PathValue("id"))
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
		return svc.AddDevice(r.Context(), r.PathValue("id"), req.Device)
	})
	h("POST /v1/snapshots/{id}/storage", func(r *http.Request) (any, error) {
		var req api.AppendStorageRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return svc.AppendStorage(r.Context(), r.PathValue("id"), req)
	})
	h("POST /v1/snapshots/{id}/take", func(r *http.Request) (any, error) {
		return svc.Take(r.Context(), r.PathValue("id"))
	})
	h("GET /v1/snapshots/{id}/event", func(r *http.Request) (any, error) {
		ms, err := strconv.ParseInt(r.URL.Query().Get("timeout_ms"), 10, 64)
		if err != nil || ms < 0 {
			return nil, fmt.Errorf("%w: timeout_ms must be a whole number of milliseconds, got %q", ErrInvalid, r.URL.Query().Get("timeout_ms"))
		}
		return svc.WaitEvent(r.Context(), r.PathValue("id"), min(time.Duration(ms)*time.Millisecond, maxEventWait))
	})
	h("GET /v1/snapshot-info", func(r *http.Request) (any, error) {
		return svc.SnapshotInfo(r.Context(), r.URL.Query().Get("device"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, fmt.Errorf("%w: no endpoint %s %s", ErrNotFound, r.Method, r.URL.Path), log)
	})
	return mux
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: request body: %v", ErrInvalid, err)
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
		return false, fmt.Errorf("%w: %s must be true or false, got %q", ErrInvalid, name, s)
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

func writeError(w http.ResponseWriter, r *http.Request, err error, log *slog.Logger) {
	e := api.Error{Status: http.StatusInternalServerError, Code: api.CodeInternal, Message: err.Error()}
	switch {
	case errors.Is(err, ErrInvalid):
		e.Status, e.Code = http.StatusBadRequest, api.CodeBadRequest
	case errors.Is(err, ErrNotFound):
		e.Status, e.Code = http.StatusNotFound, api.CodeNotFound
	case errors.Is(err, ErrConflict):
		e.Status, e.Code = http.StatusConflict, api.CodeConflict
	}
	log.Info("request failed", "method", r.Method, "path", r.URL.Path, "status", e.Status, "err", err)
	writeJSON(w, e.Status, e)
}

// Listen opens the daemon's unix socket with mode 0600, creating its
// directory. A lock on SOCKET.lock, held until the listener is closed, makes
// a second daemon on the same socket fail with ErrRunning; a stale socket
// file left by a daemon that died is replaced.
func Listen(socket string) (net.Listener, error) {
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
	l, err := net.Listen("unix", socket)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("listen on %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		l.Close()
		lock.Close()
		return nil, fmt.Errorf("chmod %s: %w", socket, err)
	}
	return &lockedListener{Listener: l, lock: lock}, nil
}

// lockedListener releases the daemon's lock file when closed.
type lockedListener struct {
	net.Listener
	lock *os.File // holds the flock while the daemon listens
}

func (l *lockedListener) Close() error {
	err := l.Listener.Close()
	l.lock.Close()
	return err
}
