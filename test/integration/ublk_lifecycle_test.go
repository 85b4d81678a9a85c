//go:build vmtest

package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/ublk"
)

// TestUblkLifecycle adds, starts, stops and deletes a device 50 times in a
// row with one and with two queues; every round must leave no node behind.
func TestUblkLifecycle(t *testing.T) {
	requireNoUblkDevices(t, "before the test")
	for _, queues := range []int{1, 2} {
		t.Run(fmt.Sprintf("queues=%d", queues), func(t *testing.T) {
			b, cfg := passthrough(t, tempFile(t, 16<<20))
			cfg.Queues, cfg.Depth = queues, 64
			start := time.Now()
			for i := 0; i < 50; i++ {
				d, err := ublk.New(context.Background(), cfg, b)
				if err != nil {
					t.Fatalf("round %d: New: %v", i, err)
				}
				if d.Queues() != queues {
					t.Fatalf("round %d: kernel granted %d queues, want %d", i, d.Queues(), queues)
				}
				if fi, err := os.Stat(d.Path()); err != nil || fi.Mode()&os.ModeDevice == 0 {
					t.Fatalf("round %d: %s after New: %v %v", i, d.Path(), fi, err)
				}
				if i == 0 {
					info, err := d.Info()
					if err != nil {
						t.Fatalf("Info: %v", err)
					}
					t.Logf("kernel view: %+v", info)
					if info.State != "live" || info.ServerPID != os.Getpid() || info.Size != cfg.Size ||
						info.Queues != queues || info.Depth != cfg.Depth || info.DiskMajor == 0 {
						t.Fatalf("kernel view %+v does not match the config %+v", info, cfg)
					}
				}
				closeDevice(t, d)
				if err := d.Close(); err != nil {
					t.Fatalf("round %d: second Close: %v", i, err)
				}
				requireNoUblkDevices(t, fmt.Sprintf("round %d after Close", i))
			}
			t.Logf("50 rounds with %d queues in %v", queues, time.Since(start))
		})
	}
}

// TestUblkContextCancel: cancelling New's context stops and deletes the device.
func TestUblkContextCancel(t *testing.T) {
	b, cfg := passthrough(t, tempFile(t, 16<<20))
	ctx, cancel := context.WithCancel(context.Background())
	d, err := ublk.New(ctx, cfg, b)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-d.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("device still running 30 s after its context was cancelled")
	}
	if err := d.Err(); err != nil {
		t.Fatalf("teardown after cancel: %v", err)
	}
	requireNoUblkDevices(t, "after cancel")
}

// TestUblkBadConfig: absurd configs fail before any kernel call.
func TestUblkBadConfig(t *testing.T) {
	before := ublkCharDevs(t)
	good := ublk.DefaultConfig(64 << 20)
	for name, mutate := range map[string]func(*ublk.Config){
		"size 0":              func(c *ublk.Config) { c.Size = 0 },
		"size not aligned":    func(c *ublk.Config) { c.Size = 1000 },
		"depth 0":             func(c *ublk.Config) { c.Depth = 0 },
		"depth 4097":          func(c *ublk.Config) { c.Depth = 4097 },
		"block size 1000":     func(c *ublk.Config) { c.LogicalBlockSize = 1000 },
		"physical below logi": func(c *ublk.Config) { c.LogicalBlockSize, c.PhysicalBlockSize = 4096, 512 },
		"queues 0":            func(c *ublk.Config) { c.Queues = 0 },
		"max io 1000":         func(c *ublk.Config) { c.MaxIOSize = 1000 },
	} {
		cfg := good
		mutate(&cfg)
		d, err := ublk.New(context.Background(), cfg, ublk.HandlerFunc(func(*ublk.Request) error { return nil }))
		if err == nil {
			d.Close()
			t.Errorf("%s: New succeeded", name)
			continue
		}
		if !errors.Is(err, ublk.ErrInvalidConfig) {
			t.Errorf("%s: error %v does not wrap ErrInvalidConfig", name, err)
		}
		t.Logf("%s: %v", name, err)
	}
	if after := ublkCharDevs(t); len(after) != len(before) {
		t.Fatalf("bad configs created kernel devices: before %v after %v", before, after)
	}
}

// TestUblkKernelFeatures reports what the running kernel's ublk offers
// (GET_FEATURES): features are detected, never assumed from a version.
func TestUblkKernelFeatures(t *testing.T) {
	c, err := ublk.OpenCtrl()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	feats, err := c.Features()
	if err != nil {
		t.Fatalf("GET_FEATURES: %v", err)
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	t.Logf("kernel %s: ublk features %#x", unix.ByteSliceToString(uts.Release[:]), feats)
	if feats == 0 {
		t.Error("GET_FEATURES answered no feature at all")
	}
}
