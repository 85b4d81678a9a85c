//go:build vmtest

package integration

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// ublkDevice starts a ublk device of size bytes over a fresh tmpfs backing
// file, served by wrap(the pass-through handler, the backing) (the
// pass-through itself when wrap is nil). The device is closed at cleanup if the test has not
// closed it.
func ublkDevice(t testing.TB, size int64, queues, depth int, wrap func(ublk.Handler, *storage.File) ublk.Handler) (*ublk.Device, string, *storage.File) {
	t.Helper()
	return ublkDeviceOpts(t, size, queues, depth, storage.OpenOptions{}, wrap)
}

// ublkDeviceOpts is ublkDevice with options for the backing file.
func ublkDeviceOpts(t testing.TB, size int64, queues, depth int, opts storage.OpenOptions, wrap func(ublk.Handler, *storage.File) ublk.Handler) (*ublk.Device, string, *storage.File) {
	t.Helper()
	file := tempFile(t, size)
	d, b := ublkDeviceOver(t, file, queues, depth, opts, wrap)
	return d, file, b
}

// ublkDeviceOver starts a ublk device over the backing file or block device
// at path, as ublkDeviceOpts does, and returns it with the opened backing.
func ublkDeviceOver(t testing.TB, path string, queues, depth int, opts storage.OpenOptions, wrap func(ublk.Handler, *storage.File) ublk.Handler) (*ublk.Device, *storage.File) {
	t.Helper()
	d, b, err := ublkDeviceIn(t, path, ublk.IOModeAuto, queues, depth, opts, wrap)
	if err != nil {
		t.Fatal(err)
	}
	return d, b
}

// ublkDeviceIn is ublkDeviceOver in the I/O mode mode; it returns the
// error of ublk.New (ublk.ErrNotSupported when the kernel lacks the mode).
func ublkDeviceIn(t testing.TB, path string, mode ublk.IOMode, queues, depth int, opts storage.OpenOptions, wrap func(ublk.Handler, *storage.File) ublk.Handler) (*ublk.Device, *storage.File, error) {
	t.Helper()
	b, err := storage.OpenWith(path, opts)
	if err != nil {
		t.Fatalf("open backing %s: %v", path, err)
	}
	t.Cleanup(func() { b.Close() })
	cfg := snapshot.DeviceConfig(b, nil)
	cfg.Queues, cfg.Depth, cfg.IOMode = queues, depth, mode
	h := snapshot.NewPassthrough(b, slog.Default())
	if wrap != nil {
		h = wrap(h, b)
	}
	d, err := ublk.New(context.Background(), cfg, h)
	if err != nil {
		return nil, nil, fmt.Errorf("ublk.New(%d MiB, %d queues, depth %d, %v): %w", cfg.Size>>20, queues, depth, mode, err)
	}
	t.Cleanup(func() { closeDevice(t, d) })
	if _, err := os.Stat(d.Path()); err != nil {
		t.Fatalf("device started but %s is missing: %v", d.Path(), err)
	}
	return d, b, nil
}

// syncFile serves requests synchronously from a storage.File, whatever
// NoWait says: the plain backend of the tests of ublk's handler contract.
type syncFile struct{ f *storage.File }

func (s syncFile) Handle(r *ublk.Request) error {
	var err error
	switch r.Op {
	case ublk.OpRead:
		_, err = s.f.ReadAt(r.Buf, r.Offset)
	case ublk.OpWrite:
		_, err = s.f.WriteAt(r.Buf, r.Offset)
	case ublk.OpFlush:
		err = s.f.Flush()
	case ublk.OpDiscard:
		err = s.f.Discard(r.Offset, int64(r.Length))
	case ublk.OpWriteZeroes:
		err = s.f.WriteZeroes(r.Offset, int64(r.Length))
	default:
		err = syscall.EOPNOTSUPP
	}
	return err
}

// passthrough opens a backing file and returns the pass-through handler
// over it and its device configuration.
func passthrough(t testing.TB, file string) (ublk.Handler, ublk.Config) {
	t.Helper()
	b, err := storage.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return snapshot.NewPassthrough(b, slog.Default()), snapshot.DeviceConfig(b, nil)
}

// closeDevice closes d within a minute or fails the test.
func closeDevice(t testing.TB, d *ublk.Device) {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- d.Close() }()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("close %s: %v", d.Path(), err)
		}
	case <-time.After(time.Minute):
		t.Fatalf("close %s hangs after a minute", d.Path())
	}
}

// ublkNodes lists /dev/ublkb* and /dev/ublkc* nodes.
func ublkNodes(t testing.TB) []string {
	t.Helper()
	var out []string
	for _, pat := range []string{"/dev/ublkb*", "/dev/ublkc*"} {
		m, err := filepath.Glob(pat)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m...)
	}
	return out
}

// ublkCharDevs lists the devices the kernel knows (/sys/class/ublk-char).
func ublkCharDevs(t testing.TB) []string {
	t.Helper()
	ents, err := os.ReadDir("/sys/class/ublk-char")
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// requireNoUblkDevices fails if any ublk device or node exists.
func requireNoUblkDevices(t testing.TB, when string) {
	t.Helper()
	if n := ublkNodes(t); len(n) > 0 {
		t.Fatalf("%s: leaked device nodes %s", when, strings.Join(n, " "))
	}
	if n := ublkCharDevs(t); len(n) > 0 {
		t.Fatalf("%s: kernel still has ublk devices %s", when, strings.Join(n, " "))
	}
}
