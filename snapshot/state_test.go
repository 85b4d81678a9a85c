package snapshot

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
)

// crashAndRestart ends the manager as a crash would, leaving the fake
// kernel's devices and the state file as they are, and starts a second
// Manager on the same server and state file, as a restarted daemon would.
func (e *env) crashAndRestart(statePath string) {
	e.t.Helper()
	e.srv.crash()
	e.m.state.path = "" // a dead process writes nothing
	if err := e.m.Close(); err != nil {
		e.t.Fatal(err)
	}
	m, err := New(Config{Params: testParams(), Server: e.srv, Host: e.host, StatePath: statePath,
		Logger: slog.New(slog.NewTextHandler(testLog{e.t}, nil))})
	if err != nil {
		e.t.Fatal(err)
	}
	e.m = m
}

// takeSnapshot takes a snapshot of dev and returns its id.
func (e *env) takeSnapshot(dev string) string {
	e.t.Helper()
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{dev}, Storage: e.dir, Limit: 8 << 20})
	if err == nil {
		s, err = e.m.Take(bg, s.ID)
	}
	if err != nil {
		e.t.Fatalf("snapshot of %s: %v", dev, err)
	}
	return s.ID
}

func readState(t *testing.T, p string) stateFile {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestStateFileFollowsAttachAndDetach(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	b := e.attach("b.img", 2)
	st := readState(t, statePath)
	if len(st.Devices) != 2 || st.Devices[0].Queues < 1 || st.Devices[0].Depth < 1 || st.Params == nil || *st.Params != testParams() {
		t.Fatalf("state after two attaches: %+v", st)
	}
	for _, d := range e.m.devices {
		if !d.blk.(*fakeBlock).srv.kernel[d.blk.ID()].Recoverable() {
			t.Errorf("%s was not created recoverable", d.path())
		}
	}
	if err := e.m.Detach(bg, a, false); err != nil {
		t.Fatal(err)
	}
	st = readState(t, statePath)
	if len(st.Devices) != 1 || st.Devices[0].Backing != filepath.Join(e.dir, "b.img") {
		t.Fatalf("state after detaching %s (keeping %s): %+v", a, b, st)
	}
	if _, err := os.Stat(statePath + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary state file left behind: %v", err)
	}
}

// dirNames lists the names in dir.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// The state file is written without Manager.mu: while a write hangs (in
// its fsync, say), the manager answers; and of two states written out of
// order, the file keeps the later one.
func TestStateIsWrittenWithoutTheManagerLock(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	e.m.state.mu.Lock() // the next write hangs
	created := make(chan error, 1)
	go func() {
		_, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
		created <- err
	}()
	// Status takes Manager.mu: it would wait forever if the write held it.
	for len(e.m.Status(bg).Snapshots) == 0 {
		runtime.Gosched()
	}
	if st := readState(t, statePath); len(st.Snapshots) != 0 {
		t.Fatalf("state file before its write: %+v", st.Snapshots)
	}
	e.m.state.mu.Unlock()
	if err := <-created; err != nil {
		t.Fatal(err)
	}
	if st := readState(t, statePath); len(st.Snapshots) != 1 {
		t.Fatalf("state file after the create: %+v, want its snapshot", st.Snapshots)
	}

	e.m.mu.Lock()
	older := e.m.encodeStateLocked()
	e.m.freezing = []string{a}
	newer := e.m.encodeStateLocked()
	e.m.freezing = nil
	e.m.mu.Unlock()
	for _, p := range []pendingState{newer, older} {
		if err := p.write(); err != nil {
			t.Fatal(err)
		}
	}
	if st := readState(t, statePath); !slices.Equal(st.Freezing, []string{a}) {
		t.Fatalf("freezing after writes out of order: %v, want the later state's %v", st.Freezing, []string{a})
	}
}
