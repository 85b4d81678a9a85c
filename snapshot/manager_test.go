package snapshot

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"

	"github.com/ublksnap/ublksnap/internal/caller"
	"github.com/ublksnap/ublksnap/internal/testwait"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var bg = context.Background()

func TestCreateTakeDestroy(t *testing.T) {
	e := newEnv(t, Config{})
	a, b := e.attach("a.img", 0xaa), e.attach("b.img", 0xbb)
	storagePath := filepath.Join(e.dir, "diff")
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: storagePath, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if s.State != StateCreated || len(s.Members) != 1 {
		t.Fatalf("created %+v", s)
	}
	if s, err = e.m.AddDevice(bg, s.ID, b); err != nil || len(s.Members) != 2 {
		t.Fatalf("AddDevice = %+v, %v", s, err)
	}
	if s, err = e.m.Take(bg, s.ID); err != nil {
		t.Fatal(err)
	}
	if s.State != StateTaken || s.Members[0].Image == "" || s.Members[1].Image == "" {
		t.Fatalf("taken %+v", s)
	}

	// A write to the original copies the old chunk; the image keeps it.
	da := e.m.devices[a]
	if err := da.orig.Write(bg, 0, bytes.Repeat([]byte{1}, 4096), false); err != nil {
		t.Fatal(err)
	}
	img := make([]byte, 4096)
	if err := e.m.snapshots[s.ID].members[0].area.ReadImage(bg, img, 0, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img, bytes.Repeat([]byte{0xaa}, 4096)) {
		t.Fatalf("image shows %x..., want the snapshot's aa", img[:8])
	}
	if info, _ := e.m.Snapshot(bg, s.ID); info.Members[0].ChunksCopied != 1 {
		t.Errorf("chunks copied %d, want 1", info.Members[0].ChunksCopied)
	}
	st, err := e.m.DeviceState(bg, a)
	if err != nil || st.State != StateTaken || st.Snapshot != s.ID || st.Image != s.Members[0].Image {
		t.Errorf("DeviceState = %+v, %v", st, err)
	}

	if err := e.m.Destroy(bg, s.ID, false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(storagePath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("storage file the manager created is still there: %v", err)
	}
	for _, blk := range e.srv.served[2:] {
		if !blk.closed {
			t.Errorf("image %s not closed", blk.path)
		}
	}
	if da.orig.DiffArea() != nil {
		t.Error("the original is still in COW after destroy")
	}
	if err := e.m.Detach(bg, a, false); err != nil {
		t.Errorf("detach after destroy: %v", err)
	}
	if got := e.m.Status(bg); len(got.Devices) != 1 || len(got.Snapshots) != 0 {
		t.Errorf("status after destroy and detach: %+v", got)
	}
}

// Every difference area the manager creates, of every member of every
// snapshot, draws its chunk buffers on the manager's one budget of
// diff_buffer_memory_limit bytes.
func TestDiffAreasShareOneBudget(t *testing.T) {
	p := testParams()
	p.DiffBufferMemoryLimit = 1 << 20
	p.ChunkCopyInKernel = 0 // chunks through buffers, not copied in the kernel
	e := newEnv(t, Config{Params: p})
	a, b, c := e.attach("a.img", 1), e.attach("b.img", 2), e.attach("c.img", 3)
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a, b}, Storage: filepath.Join(e.dir, "ab"), Limit: 8 << 20})
	if err == nil {
		_, err = e.m.Take(bg, s.ID)
	}
	if err != nil {
		t.Fatal(err)
	}
	other := e.takeSnapshot(c)
	if got := e.m.buffers.Limit(); got != p.DiffBufferMemoryLimit {
		t.Errorf("budget of %d bytes, want diff_buffer_memory_limit %d", got, p.DiffBufferMemoryLimit)
	}
	for _, id := range []string{s.ID, other} {
		for _, mb := range e.m.snapshots[id].members {
			if mb.area.BufferBudget() != e.m.buffers {
				t.Errorf("the area of %s in %s has a budget of its own", mb.dev.path(), id)
			}
		}
	}
	for _, dev := range []string{a, b, c} {
		if err := e.m.devices[dev].orig.Write(bg, 0, make([]byte, 4096), false); err != nil {
			t.Fatal(err)
		}
	}
	if st := e.m.buffers.Stats(); st.Peak < 3<<16 || st.Peak > st.Limit {
		t.Errorf("budget %+v; want the three first chunks (64 KiB each) counted, within the limit", st)
	}
}

func TestMembershipRules(t *testing.T) {
	e := newEnv(t, Config{})
	a, b := e.attach("a.img", 1), e.attach("b.img", 2)
	create := func(devs ...string) (SnapshotInfo, error) {
		return e.m.CreateSnapshot(bg, CreateOptions{Devices: devs, Storage: e.dir, Limit: 8 << 20})
	}
	s1, err := create(a)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		err  error
		want error
	}{
		"in another snapshot": {func() error { _, err := create(a); return err }(), ErrConflict},
		"given twice":         {func() error { _, err := create(b, b); return err }(), ErrInvalid},
		"already a member":    {func() error { _, err := e.m.AddDevice(bg, s1.ID, a); return err }(), ErrConflict},
		"unknown device":      {func() error { _, err := create("/dev/nope"); return err }(), ErrNotFound},
		"unknown snapshot":    {func() error { _, err := e.m.Take(bg, "nope"); return err }(), ErrNotFound},
		"detach a member":     {e.m.Detach(bg, a, true), ErrConflict},
		"tiny limit": {func() error {
			_, err := e.m.CreateSnapshot(bg, CreateOptions{Storage: e.dir, Limit: 4096})
			return err
		}(), ErrInvalid},
		"relative storage path": {func() error {
			_, err := e.m.CreateSnapshot(bg, CreateOptions{Storage: "diff", Limit: 8 << 20})
			return err
		}(), ErrInvalid},
	} {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: %v, want %v", name, tc.err, tc.want)
		}
	}
	empty, err := create()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Take(bg, empty.ID); !errors.Is(err, ErrInvalid) {
		t.Errorf("take with no devices: %v, want ErrInvalid", err)
	}
	if _, err := e.m.Take(bg, s1.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Take(bg, s1.ID); !errors.Is(err, ErrConflict) {
		t.Errorf("second take: %v, want ErrConflict", err)
	}
	if _, err := e.m.AddDevice(bg, s1.ID, b); !errors.Is(err, ErrConflict) {
		t.Errorf("add after take: %v, want ErrConflict", err)
	}
}

// Storage or a backing on a filesystem of a served device, or
// the device itself, would write through its own COW path.
func TestStorageOffServedDevices(t *testing.T) {
	e := newEnv(t, Config{})
	dirDev := e.dirDev()
	e.srv.devNum = func(n int) uint64 {
		if n == 1 {
			return dirDev // device 1 "holds" the test directory's filesystem
		}
		return uint64(1000 + n)
	}
	a := e.attach("a.img", 1)
	e.attach("b.img", 2) // /dev/fake1, whose filesystem holds e.dir
	for name, err := range map[string]error{
		"create in a directory": func() error {
			_, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
			return err
		}(),
		"create a new file": func() error {
			_, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: filepath.Join(e.dir, "new"), Limit: 8 << 20})
			return err
		}(),
		"attach a file there": func() error {
			_, err := e.m.Attach(bg, AttachOptions{Backing: e.file("c.img", 1<<20, 3)})
			return err
		}(),
	} {
		if !errors.Is(err, ErrInvalid) || !strings.Contains(fmtErr(err), "/dev/fake1") {
			t.Errorf("%s: %v, want ErrInvalid naming /dev/fake1", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(e.dir, "new")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused create left a file behind: %v", err)
	}
}

func fmtErr(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// The storage must not be a member's backing, by
// identity, not by path string.
func TestStorageIsNotABacking(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	alias := filepath.Join(e.dir, "alias")
	if err := os.Symlink(filepath.Join(e.dir, "a.img"), alias); err != nil {
		t.Fatal(err)
	}
	_, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: alias, Limit: 8 << 20, Force: true})
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("storage on a member's backing through a symlink: %v, want ErrInvalid", err)
	}
	if _, err := e.m.Attach(bg, AttachOptions{Backing: alias}); !errors.Is(err, ErrConflict) {
		t.Errorf("attaching the same backing through a symlink: %v, want ErrConflict", err)
	}
}

// An image exists only once its member is in COW, so that it
// shows the snapshot instant from the first byte anyone can read.
func TestImageServedAfterSwitch(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	d := e.m.devices[a]
	served := 0
	e.srv.onServe = func(ublk.Config, ublk.Handler) {
		served++
		if d.orig.DiffArea() == nil {
			t.Error("image served before its original switched to COW")
		}
		if e.host.isFrozen(d.blk.DevNum()) {
			t.Error("image served while the filesystem was still frozen")
		}
	}
	if _, err := e.m.Take(bg, s.ID); err != nil {
		t.Fatal(err)
	}
	if served != 1 {
		t.Fatalf("%d images served, want 1", served)
	}
}

// A take whose image cannot be served leaves the snapshot as it was.
func TestTakeFailureUndoes(t *testing.T) {
	e := newEnv(t, Config{Server: failingServer{&fakeServer{}}})
	_ = e
	// Attach needs a working server: use a second manager for the device.
	e2 := newEnv(t, Config{})
	a := e2.attach("a.img", 1)
	s, err := e2.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e2.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e2.m.server = failingServer{e2.srv}
	if _, err := e2.m.Take(bg, s.ID); err == nil {
		t.Fatal("take succeeded with a failing block server")
	}
	if d := e2.m.devices[a]; d.orig.DiffArea() != nil {
		t.Error("a failed take left the original in COW")
	}
	if info, _ := e2.m.Snapshot(bg, s.ID); info.State != StateCreated || info.Members[0].Image != "" {
		t.Errorf("after a failed take: %+v", info)
	}
	e2.m.server = e2.srv
	if _, err := e2.m.Take(bg, s.ID); err != nil {
		t.Errorf("take after a failed take: %v", err)
	}
}

type failingServer struct{ *fakeServer }

func (failingServer) Serve(context.Context, ublk.Config, ublk.Handler) (BlockDevice, error) {
	return nil, syscall.ENOMEM
}

// Detach refuses while the device is mounted or open.
func TestDetachRefusesWhileHeld(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	e.host.setHolders(e.m.devices[a].blk.DevNum(), "mounted on /mnt", "open by pid 7 (fio)")
	err := e.m.Detach(bg, a, false)
	if !errors.Is(err, ErrBusy) || Errno(err) != syscall.EBUSY || !strings.Contains(err.Error(), "mounted on /mnt") {
		t.Fatalf("detach of a mounted device: %v, want ErrBusy naming the mount", err)
	}
	if len(e.m.Status(bg).Devices) != 1 {
		t.Fatal("a refused detach removed the device")
	}
	if err := e.m.Detach(bg, a, true); err != nil {
		t.Fatalf("forced detach: %v", err)
	}
}

// Destroy without force refuses while an image is held.
func TestDestroyRefusesWhileImageHeld(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	s, _ := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if _, err := e.m.Take(bg, s.ID); err != nil {
		t.Fatal(err)
	}
	img := e.m.snapshots[s.ID].members[0].image
	e.host.setHolders(img.DevNum(), "mounted on /backup")
	if err := e.m.Destroy(bg, s.ID, false); !errors.Is(err, ErrBusy) {
		t.Fatalf("destroy with a mounted image: %v, want ErrBusy", err)
	}
	if err := e.m.Destroy(bg, s.ID, true); err != nil {
		t.Fatalf("forced destroy: %v", err)
	}
}

// A teardown that hangs neither blocks other requests nor keeps
// Destroy from returning.
func TestDestroyDoesNotHangTheManager(t *testing.T) {
	e := newEnv(t, Config{DestroyTimeout: 300 * time.Millisecond})
	a := e.attach("a.img", 1)
	s, _ := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if _, err := e.m.Take(bg, s.ID); err != nil {
		t.Fatal(err)
	}
	hang := make(chan struct{})
	e.srv.closeCh, e.srv.closing = hang, make(chan struct{}, 1) // the image's Close hangs
	destroyed := make(chan error, 1)
	go func() { destroyed <- e.m.Destroy(bg, s.ID, true) }()
	status := make(chan Status, 1)
	go func() {
		<-e.srv.closing // the teardown hangs
		status <- e.m.Status(bg)
	}()
	select {
	case st := <-status:
		if len(st.Snapshots) != 0 {
			t.Errorf("the snapshot being destroyed is still listed: %+v", st.Snapshots)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Status waited for a hung destroy")
	}
	select {
	case err := <-destroyed:
		if err != nil {
			t.Errorf("Destroy: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Destroy did not return while the teardown hung")
	}
	close(hang) // the teardown finishes in the background
	deadline := time.Now().Add(5 * time.Second)
	for {
		if st, _ := e.m.DeviceState(bg, a); st.State == StateNone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the member was not freed after the teardown finished")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A waiter on a destroyed snapshot is told at once.
func TestWaitEventEndsOnDestroy(t *testing.T) { synctest.Test(t, testWaitEventEndsOnDestroy) }

func testWaitEventEndsOnDestroy(t *testing.T) {
	e := newEnv(t, Config{})
	s, _ := e.m.CreateSnapshot(bg, CreateOptions{Storage: e.dir, Limit: 8 << 20})
	for { // drain what creation posted
		if _, err := e.m.WaitEvent(bg, s.ID, 0); errors.Is(err, storage.ErrTimeout) {
			break
		}
	}
	got := make(chan error, 1)
	go func() {
		_, err := e.m.WaitEvent(bg, s.ID, time.Hour)
		got <- err
	}()
	synctest.Wait() // the waiter sleeps
	if err := e.m.Destroy(bg, s.ID, false); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "destroyed") {
			t.Errorf("waiter got %v, want not found: destroyed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a waiter on a destroyed snapshot still sleeps")
	}
	if _, err := e.m.AppendStorage(bg, s.ID, e.file("x", 1<<20, 0), nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("append-storage after destroy: %v, want ErrNotFound", err)
	}
}

// A sector range a user gives with a negative start or count is refused as
// invalid before the storage sees it; a good one is added.
func TestAppendStorageRefusesNegativeRanges(t *testing.T) {
	e := newEnv(t, Config{})
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Storage: e.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	more := e.file("more", 1<<20, 0)
	for _, r := range []storage.Range{{Start: -8, Count: 8}, {Start: 0, Count: -8}} {
		if _, err := e.m.AppendStorage(bg, s.ID, more, []storage.Range{r}); !errors.Is(err, ErrInvalid) || Errno(err) != syscall.EINVAL {
			t.Errorf("append-storage of %+v: %v, want ErrInvalid (EINVAL)", r, err)
		}
	}
	if _, err := e.m.AppendStorage(bg, s.ID, more, []storage.Range{{Start: 0, Count: 8}}); err != nil {
		t.Errorf("append-storage of a good range: %v", err)
	}
}

// An existing non-empty file is not overwritten unless forced.
func TestExistingStorageFileNeedsForce(t *testing.T) {
	e := newEnv(t, Config{})
	precious := e.file("precious", 1<<20, 0x42)
	_, err := e.m.CreateSnapshot(bg, CreateOptions{Storage: precious, Limit: 8 << 20})
	if !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("create over an existing file: %v, want a conflict mentioning --force", err)
	}
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Storage: precious, Limit: 8 << 20, Force: true})
	if err != nil {
		t.Fatalf("forced: %v", err)
	}
	if err := e.m.Destroy(bg, s.ID, false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(precious); err != nil {
		t.Errorf("a file the manager did not create was removed: %v", err)
	}
}

// Paths resolve in the caller's view of the filesystem.
func TestPathsResolveUnderCallerRoot(t *testing.T) {
	e := newEnv(t, Config{})
	root := t.TempDir()
	ctx := caller.With(bg, caller.Caller{Root: root})
	s, err := e.m.CreateSnapshot(ctx, CreateOptions{Storage: "/diff", Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "diff")); err != nil {
		t.Errorf("the storage file is not under the caller's root: %v", err)
	}
	if _, err := os.Stat("/diff"); err == nil {
		t.Error("the storage file landed in the daemon's own root")
	}
	info, _ := e.m.Snapshot(bg, s.ID)
	if info.ID != s.ID {
		t.Fatal("snapshot lost")
	}
	if err := e.m.Destroy(bg, s.ID, false); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "diff")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the created storage file survived destroy: %v", err)
	}
	if _, err := e.m.Attach(ctx, AttachOptions{Backing: "/missing.img"}); Errno(err) != syscall.ENOENT {
		t.Errorf("attach of a missing file: %v (errno %d), want ENOENT", err, Errno(err))
	}
}

// A difference storage on a file system that cannot hold one (procfs) is a
// bad request, and nothing is left behind.
func TestCreateSnapshotStorageUnfit(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 0xaa)
	_, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: "/proc", Limit: 8 << 20})
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "cannot hold") {
		t.Fatalf("CreateSnapshot on /proc: %v, want ErrInvalid saying it cannot hold one", err)
	}
	if snaps := e.m.Snapshots(bg); len(snaps) != 0 {
		t.Errorf("snapshots after the refusal: %+v", snaps)
	}
}

// A take whose freeze hangs fails within the take timeout, and the
// filesystem is thawed once the freeze completes.
func TestTakeAbandonsAHungFreeze(t *testing.T) {
	e := newEnv(t, Config{TakeTimeout: 100 * time.Millisecond})
	a := e.attach("a.img", 1)
	e.host.hang = make(chan struct{})
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := e.m.Take(bg, s.ID); !errors.Is(err, ErrBusy) {
		t.Fatalf("take with a hung freeze: %v, want ErrBusy", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("take with a hung freeze took %v", took)
	}
	close(e.host.hang)
	dev := e.m.devices[a].blk.DevNum()
	testwait.For(t, "the filesystem thawed after the abandoned freeze completed", func() bool {
		return !e.host.isFrozen(dev) && e.host.wasFrozen(dev)
	})
}

// A take runs without the manager's lock: while its freeze hangs, status
// answers, the snapshot cannot gain a device or a second take, a destroy
// within a short context gives up, and one without waits for the take and
// then destroys the snapshot.
func TestTakeRunsWithoutTheManagerLock(t *testing.T) {
	e := newEnv(t, Config{TakeTimeout: time.Hour})
	a, b := e.attach("a.img", 1), e.attach("b.img", 1)
	e.host.hang, e.host.entered = make(chan struct{}), make(chan uint64, 1)
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	took := make(chan error, 1)
	go func() {
		_, err := e.m.Take(bg, s.ID)
		took <- err
	}()
	<-e.host.entered // the take is in its freeze
	if st := e.m.Status(bg); len(st.Snapshots) != 1 || st.Snapshots[0].State != StateCreated {
		t.Fatalf("status during the take: %+v, want the snapshot, not yet taken", st.Snapshots)
	}
	if _, err := e.m.Take(bg, s.ID); !errors.Is(err, ErrConflict) {
		t.Fatalf("a second take during the take: %v, want ErrConflict", err)
	}
	if _, err := e.m.AddDevice(bg, s.ID, b); !errors.Is(err, ErrConflict) {
		t.Fatalf("adding a device during the take: %v, want ErrConflict", err)
	}
	short, cancel := context.WithCancel(bg)
	cancel()
	if err := e.m.Destroy(short, s.ID, false); !errors.Is(err, context.Canceled) {
		t.Fatalf("destroy within a cancelled context during the take: %v, want context.Canceled", err)
	}
	destroyed := make(chan error, 1)
	go func() { destroyed <- e.m.Destroy(bg, s.ID, false) }()
	close(e.host.hang)
	if err := <-took; err != nil {
		t.Fatalf("take: %v", err)
	}
	if err := <-destroyed; err != nil {
		t.Fatalf("destroy after the take: %v", err)
	}
	if ids := e.m.Snapshots(bg); len(ids) != 0 {
		t.Fatalf("snapshots after the destroy: %v", ids)
	}
	if _, err := e.m.AddDevice(bg, s.ID, b); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the destroyed snapshot: %v, want ErrNotFound", err)
	}
}

// Shutdown for good is refused while a device or an image is held, and
// accepted with force.
func TestShutdownRefusesWhileHeld(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	e.host.setHolders(e.m.devices[a].blk.DevNum(), "mounted on /mnt")
	if err := e.m.Shutdown(bg, false); !errors.Is(err, ErrBusy) {
		t.Fatalf("shutdown with a mounted device: %v, want ErrBusy", err)
	}
	select {
	case <-e.m.ShutdownRequested():
		t.Fatal("a refused shutdown was signalled")
	default:
	}
	if err := e.m.Shutdown(bg, true); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.m.ShutdownRequested():
	default:
		t.Fatal("an accepted shutdown was not signalled")
	}
}
