//go:build vmtest

package integration

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
	"golang.org/x/sys/unix"
)

// reqKind sorts requests by what they may wait for.
type reqKind int

const (
	kindRead reqKind = iota
	kindWrite
	kindFUA
	kindFlush
	kindOther
	nKinds
)

func kindOf(r *ublk.Request) reqKind {
	switch {
	case r.Op == ublk.OpRead:
		return kindRead
	case r.Op == ublk.OpWrite && r.Flags&ublk.FlagFUA != 0:
		return kindFUA
	case r.Op == ublk.OpWrite:
		return kindWrite
	case r.Op == ublk.OpFlush:
		return kindFlush
	}
	return kindOther
}

// queueWatch counts, per kind of request, what the handler did on the
// queue thread (served it, or left it to a worker) and on the workers, and
// passes the outcome of the ring I/O on to the handler's Finish.
type queueWatch struct {
	inner    ublk.Handler
	served   [nKinds]atomic.Int64 // served on the queue thread
	deferred [nKinds]atomic.Int64 // answered would-block on the queue thread
	worker   [nKinds]atomic.Int64 // served on a worker
}

func (w *queueWatch) Handle(r *ublk.Request) error {
	k := kindOf(r)
	err := w.inner.Handle(r)
	switch {
	case !r.NoWait():
		w.worker[k].Add(1)
	case errors.Is(err, ublk.ErrWouldBlock) || errors.Is(err, syscall.EAGAIN):
		w.deferred[k].Add(1)
	default:
		w.served[k].Add(1)
	}
	return err
}

func (w *queueWatch) Finish(r *ublk.Request, err error) error {
	if f, ok := w.inner.(ublk.Finisher); ok {
		return f.Finish(r, err)
	}
	return err
}

// heldDevice is a device-mapper device over a block device whose second
// half maps through an inner device that hold suspends (--noflush: I/O to
// that half waits in device-mapper, for as long as the test wants, until
// release resumes it).
type heldDevice struct {
	path  string // the outer device's node
	inner string // the inner device's name
	sysfs string // the outer device's /sys/dev/block directory
}

// newHeldDevice makes a heldDevice over the block device dev.
func newHeldDevice(t *testing.T, dev string) *heldDevice {
	t.Helper()
	sectors := blockSectors(t, dev)
	half := sectors / 2
	base := fmt.Sprintf("ublksnap-held-%d", os.Getpid())
	h := &heldDevice{inner: base + "-inner"}
	dmsetup(t, fmt.Sprintf("0 %d linear %s %d\n", sectors-half, dev, half), "create", h.inner)
	t.Cleanup(func() { dmsetup(t, "", "remove", "--retry", h.inner) })
	outer := base + "-outer"
	dmsetup(t, fmt.Sprintf("0 %d linear %s 0\n%d %d linear /dev/mapper/%s 0\n", half, dev, half, sectors-half, h.inner), "create", outer)
	t.Cleanup(func() { dmsetup(t, "", "remove", "--retry", outer) })
	h.path = "/dev/mapper/" + outer
	var st unix.Stat_t
	if err := unix.Stat(h.path, &st); err != nil {
		t.Fatal(err)
	}
	h.sysfs = fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	return h
}

// hold suspends the slow half until release (also at cleanup).
func (h *heldDevice) hold(t *testing.T) {
	dmsetup(t, "", "suspend", "--noflush", h.inner)
	t.Cleanup(func() { h.release(t) })
}

func (h *heldDevice) release(t *testing.T) { dmsetup(t, "", "resume", h.inner) }

// readsInFlight is the number of reads the outer device has started and
// not finished.
func (h *heldDevice) readsInFlight(t *testing.T) int {
	b, err := os.ReadFile(h.sysfs + "/inflight")
	if err != nil {
		t.Fatal(err)
	}
	var r, w int
	if _, err := fmt.Sscan(string(b), &r, &w); err != nil {
		t.Fatalf("%s/inflight: %q: %v", h.sysfs, b, err)
	}
	return r
}

// dmsetup runs dmsetup with args and table on its input, without udev
// (dmsetup makes the /dev/mapper nodes itself).
func dmsetup(t *testing.T, table string, args ...string) {
	t.Helper()
	cmd := exec.Command("dmsetup", args...)
	cmd.Stdin = strings.NewReader(table)
	cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("dmsetup %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// blockSectors returns the size of a block device in sectors.
func blockSectors(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	return n >> 9
}

// TestUblkQueueThreadNeverWaits (defect 6, and the ring I/O of issue 19)
// serves a pass-through device with one queue over a backing whose second
// half can be held (device-mapper over a loop device, one half through a
// suspended device). Every request is served as backing I/O on the queue's
// ring, none on a worker (FUA writes and flushes included), and while a
// read of the held half is stuck in the backing, reads and writes of the
// other half go on through the same queue. Nothing here depends on time:
// the held read cannot end before the test resumes its device.
func TestUblkQueueThreadNeverWaits(t *testing.T) {
	loop := loopDevice(t, tempFile(t, 32<<20))
	held := newHeldDevice(t, loop)
	slow := held.path
	var w *queueWatch
	d, _ := ublkDeviceOver(t, slow, 1, 32, storage.OpenOptions{}, func(h ublk.Handler, _ *storage.File) ublk.Handler {
		w = &queueWatch{inner: h}
		return w
	})
	// O_DIRECT|O_SYNC writes reach ublk as FUA writes; fsync as flushes.
	fio(t, "--name=fua", "--filename="+d.Path(), "--rw=randwrite", "--bs=4k", "--size=4M",
		"--direct=1", "--sync=1", "--fsync=16", "--ioengine=psync",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	for _, k := range []struct {
		name string
		kind reqKind
	}{{"read", kindRead}, {"FUA write", kindFUA}, {"flush", kindFlush}} {
		if n := w.worker[k.kind].Load() + w.deferred[k.kind].Load(); n != 0 {
			t.Errorf("%s: %d left to a worker, want 0 (all as ring I/O)", k.name, n)
		}
		if w.served[k.kind].Load() == 0 {
			t.Errorf("%s: none served", k.name)
		}
	}

	// A read of the held half, stuck in the backing until released.
	held.hold(t)
	slowRead := exec.Command("dd", "if="+d.Path(), "of=/dev/null", "bs=4k", "count=1", "skip=6144", "iflag=direct")
	var slowOut strings.Builder
	slowRead.Stdout, slowRead.Stderr = &slowOut, &slowOut
	if err := slowRead.Start(); err != nil {
		t.Fatal(err)
	}
	slowDone := make(chan error, 1)
	go func() { slowDone <- slowRead.Wait() }()
	for held.readsInFlight(t) == 0 {
		select {
		case err := <-slowDone:
			t.Fatalf("the held read ended (%v: %s) before it reached the backing", err, slowOut.String())
		case <-time.After(10 * time.Millisecond): // polling sysfs, which has no event
		}
	}
	// Requests of the other half meanwhile, through the same queue.
	fio(t, "--name=fast", "--filename="+d.Path(), "--rw=randrw", "--bs=4k", "--size=4M",
		"--direct=1", "--ioengine=psync", "--number_ios=64")
	select {
	case err := <-slowDone:
		t.Fatalf("the held read ended (%v: %s) while its device was suspended", err, slowOut.String())
	default:
	}
	held.release(t)
	if err := <-slowDone; err != nil {
		t.Fatalf("held read: %v: %s", err, slowOut.String())
	}
}
