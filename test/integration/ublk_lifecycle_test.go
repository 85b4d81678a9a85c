//go:build vmtest

package integration

import (
	"bytes"
	"context"
	"encoding/binary"
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
					if info.State != ublk.StateLive || info.ServerPID != os.Getpid() || info.Size != cfg.Size ||
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

// TestUblkNoPartitionScan serves a disk holding an MBR partition table:
// by default the kernel finds its partition, with Config.NoPartitionScan it
// does not (by UBLK_F_NO_AUTO_PART_SCAN where the kernel has it, else by an
// untrusted server), and the device still serves the partition's bytes.
func TestUblkNoPartitionScan(t *testing.T) {
	requireNoUblkDevices(t, "before the test")
	file := tempFile(t, 16<<20)
	const start, sectors = 2048, 8192
	var mbr [512]byte
	entry := mbr[446:462]
	entry[4] = 0x83 // Linux
	binary.LittleEndian.PutUint32(entry[8:], start)
	binary.LittleEndian.PutUint32(entry[12:], sectors)
	mbr[510], mbr[511] = 0x55, 0xAA
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(mbr[:], 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, noScan := range []bool{false, true} {
		t.Run(fmt.Sprintf("NoPartitionScan=%v", noScan), func(t *testing.T) {
			h, cfg := passthrough(t, file)
			cfg.NoPartitionScan = noScan
			d, err := ublk.New(context.Background(), cfg, h)
			if err != nil {
				t.Fatal(err)
			}
			defer closeDevice(t, d)
			info, err := d.Info()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("flags %#x", info.Flags)
			// The scan runs inside START_DEV: its result is there when New returns.
			part := fmt.Sprintf("/sys/block/ublkb%d/ublkb%dp1/size", d.ID(), d.ID())
			deadline := time.Now().Add(5 * time.Second)
			var size []byte
			for {
				size, err = os.ReadFile(part)
				if err == nil || noScan || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			switch {
			case noScan && err == nil:
				t.Fatalf("the kernel scanned for partitions: %s holds %s", part, size)
			case !noScan && err != nil:
				t.Fatalf("the partition was not found: %v", err)
			case !noScan && string(size) != fmt.Sprintf("%d\n", sectors):
				t.Fatalf("partition of %q sectors, want %d", size, sectors)
			}
			buf := make([]byte, 512)
			f, err := os.Open(d.Path())
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, mbr[:]) {
				t.Fatalf("first sector read through %s differs from the MBR written (%v)", d.Path(), err)
			}
		})
	}
}
