package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/storage"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// fakeService records calls and answers from a small in-memory state.
type fakeService struct {
	Service // methods not overridden panic if called: the test would fail loudly
	snaps   map[string]snapshot.SnapshotInfo
	waited  time.Duration
	forced  bool
}

func (f *fakeService) Snapshot(_ context.Context, id string) (snapshot.SnapshotInfo, error) {
	s, ok := f.snaps[id]
	if !ok {
		return snapshot.SnapshotInfo{}, fmt.Errorf("snapshot %s: %w", id, snapshot.ErrNotFound)
	}
	return s, nil
}

func (f *fakeService) CreateSnapshot(_ context.Context, opt snapshot.CreateOptions) (snapshot.SnapshotInfo, error) {
	if opt.Limit == 0 {
		return snapshot.SnapshotInfo{}, fmt.Errorf("%w: limit must be positive", snapshot.ErrInvalid)
	}
	if opt.Storage == "/busy" {
		return snapshot.SnapshotInfo{}, fmt.Errorf("open %s: %w", opt.Storage, syscall.EBUSY)
	}
	if opt.Storage == "/missing" {
		return snapshot.SnapshotInfo{}, fmt.Errorf("open %s: %w", opt.Storage, syscall.ENOENT)
	}
	s := snapshot.SnapshotInfo{ID: "11111111-2222-3333-4444-555555555555", State: snapshot.StateCreated,
		Storage: snapshot.StorageInfo{Limit: opt.Limit}}
	f.snaps[s.ID] = s
	return s, nil
}

func (f *fakeService) Take(_ context.Context, id string) (snapshot.SnapshotInfo, error) {
	s := f.snaps[id]
	if s.State == snapshot.StateTaken {
		return s, fmt.Errorf("snapshot %s: %w: already taken", id, snapshot.ErrConflict)
	}
	s.State = snapshot.StateTaken
	f.snaps[id] = s
	return s, nil
}

func (f *fakeService) WaitEvent(_ context.Context, _ string, timeout time.Duration) (storage.Event, error) {
	f.waited = timeout
	return storage.Event{}, storage.ErrTimeout
}

func (f *fakeService) Destroy(_ context.Context, id string, force bool) error {
	f.forced = force
	delete(f.snaps, id)
	return nil
}

func startServer(t *testing.T, svc Service) *api.Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "d", "ublksnap.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(context.Background(), svc, export.New(quietLog()), "test", slog.New(slog.NewTextHandler(io.Discard, nil)))
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := Listen(sock); !errors.Is(err, ErrRunning) {
		t.Errorf("second Listen on %s: %v, want ErrRunning", sock, err)
	}
	return api.NewClient(sock)
}

func TestRoundTripAndErrorMapping(t *testing.T) {
	svc := &fakeService{snaps: map[string]snapshot.SnapshotInfo{}}
	c := startServer(t, svc)
	ctx := context.Background()

	s, err := c.CreateSnapshot(ctx, api.CreateSnapshotRequest{Storage: "/x", Limit: 1 << 30})
	if err != nil || s.Storage.Limit != 1<<30 || s.State != api.StateCreated {
		t.Fatalf("CreateSnapshot = %+v, %v", s, err)
	}
	if _, err := c.Take(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	var apiErr *api.Error
	if _, err := c.Take(ctx, s.ID); !errors.As(err, &apiErr) || apiErr.Status != 409 || apiErr.Code != api.CodeConflict {
		t.Errorf("second Take: %v, want a 409 conflict", err)
	}
	if _, err := c.CreateSnapshot(ctx, api.CreateSnapshotRequest{Storage: "/x"}); !errors.As(err, &apiErr) || apiErr.Status != 400 {
		t.Errorf("CreateSnapshot without limit: %v, want 400", err)
	}
	if _, err := c.Snapshot(ctx, "nope"); !errors.As(err, &apiErr) || apiErr.Status != 404 || apiErr.Message != "snapshot nope: not found" {
		t.Errorf("Snapshot(nope): %#v, want 404 with the service's message", err)
	}
	// The errno behind a failure survives to the wire and picks the status.
	for _, tc := range []struct {
		storage string
		status  int
		errno   syscall.Errno
	}{{"/busy", 409, syscall.EBUSY}, {"/missing", 404, syscall.ENOENT}} {
		_, err := c.CreateSnapshot(ctx, api.CreateSnapshotRequest{Storage: tc.storage, Limit: 1 << 30})
		if !errors.As(err, &apiErr) || apiErr.Status != tc.status || apiErr.Errno != int(tc.errno) {
			t.Errorf("CreateSnapshot(%s): %#v, want status %d errno %d", tc.storage, err, tc.status, tc.errno)
		}
	}
	ev, err := c.WaitEvent(ctx, s.ID, 1500*time.Millisecond)
	if err != nil || ev.Code != api.EventTimeout || svc.waited != 1500*time.Millisecond {
		t.Errorf("WaitEvent = %+v, %v; service waited %v, want 1.5s", ev, err, svc.waited)
	}
	if err := c.Destroy(ctx, s.ID, true); err != nil || !svc.forced {
		t.Errorf("Destroy(force) = %v, forced=%v", err, svc.forced)
	}
}

func TestNoDaemon(t *testing.T) {
	c := api.NewClient(filepath.Join(t.TempDir(), "none.sock"))
	if _, err := c.Status(context.Background()); !errors.Is(err, api.ErrNoDaemon) {
		t.Fatalf("Status without a daemon: %v, want ErrNoDaemon", err)
	}
}

func TestDecodeRefusesTrailingData(t *testing.T) {
	svc := &fakeService{snaps: map[string]snapshot.SnapshotInfo{}}
	srv := httptest.NewServer(NewHandler(svc, export.New(quietLog()), "test", slog.New(slog.NewTextHandler(io.Discard, nil))))
	defer srv.Close()
	for body, want := range map[string]int{
		`{"storage":"/x","limit":1073741824}`:         200,
		`{"storage":"/x","limit":1073741824} garbage`: 400,
		`{"storage":"/x","limit":1073741824}{}`:       400,
	} {
		resp, err := http.Post(srv.URL+"/v1/snapshots", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("POST %q answered %d, want %d", body, resp.StatusCode, want)
		}
	}
}

func TestSocketIsNeverWiderThan0600(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	sock := filepath.Join(t.TempDir(), "ublksnap.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket created with mode %v under umask 0, want 0600", fi.Mode().Perm())
	}
}

// The profiler answers only a root peer of the unix socket; a peer whose
// credentials are unknown (TCP here) gets 403.
func TestProfilerIsRootOnly(t *testing.T) {
	svc := &fakeService{snaps: map[string]snapshot.SnapshotInfo{}}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	tcp := httptest.NewServer(NewHandler(svc, export.New(quietLog()), "test", quiet))
	defer tcp.Close()
	resp, err := http.Get(tcp.URL + "/debug/pprof/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("profiler over TCP answered %d, want 403", resp.StatusCode)
	}

	sock := filepath.Join(t.TempDir(), "ublksnap.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(context.Background(), svc, export.New(quietLog()), "test", quiet)
	go srv.Serve(l)
	defer srv.Close()
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err = client.Get("http://ublksnap/debug/pprof/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := http.StatusForbidden
	if os.Getuid() == 0 {
		want = http.StatusOK
	}
	if resp.StatusCode != want {
		t.Errorf("profiler over the socket as uid %d answered %d (%s), want %d", os.Getuid(), resp.StatusCode, body, want)
	}
}
