package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

// fakeService records calls and answers from a small in-memory state.
type fakeService struct {
	Service // methods not overridden panic if called: the test would fail loudly
	snaps   map[string]api.Snapshot
	waited  time.Duration
	forced  bool
}

func (f *fakeService) Snapshot(_ context.Context, id string) (api.Snapshot, error) {
	s, ok := f.snaps[id]
	if !ok {
		return api.Snapshot{}, fmt.Errorf("snapshot %s: %w", id, ErrNotFound)
	}
	return s, nil
}

func (f *fakeService) CreateSnapshot(_ context.Context, req api.CreateSnapshotRequest) (api.Snapshot, error) {
	if req.Limit == 0 {
		return api.Snapshot{}, fmt.Errorf("%w: limit must be positive", ErrInvalid)
	}
	s := api.Snapshot{ID: "11111111-2222-3333-4444-555555555555", State: api.StateCreated,
		Storage: api.StorageInfo{Limit: req.Limit}}
	f.snaps[s.ID] = s
	return s, nil
}

func (f *fakeService) Take(_ context.Context, id string) (api.Snapshot, error) {
	s := f.snaps[id]
	if s.State == api.StateTaken {
		return s, fmt.Errorf("snapshot %s: %w: already taken", id, ErrConflict)
	}
	s.State = api.StateTaken
	f.snaps[id] = s
	return s, nil
}

func (f *fakeService) WaitEvent(_ context.Context, _ string, timeout time.Duration) (api.Event, error) {
	f.waited = timeout
	return api.Event{Code: api.EventTimeout}, nil
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
	srv := &http.Server{Handler: NewHandler(svc, slog.New(slog.NewTextHandler(io.Discard, nil)))}
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
	svc := &fakeService{snaps: map[string]api.Snapshot{}}
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
	ev, err := c.WaitEvent(ctx, s.ID, 1500)
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
