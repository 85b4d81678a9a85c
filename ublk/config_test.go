package ublk

import (
	"errors"
	"strings"
	"testing"
)

func TestDefaultConfigValid(t *testing.T) {
	c := DefaultConfig(64 << 20)
	if err := c.Validate(); err != nil {
		t.Fatalf("DefaultConfig is invalid: %v", err)
	}
	if c.Queues < 1 || c.Queues > 4 || c.Depth != 128 {
		t.Fatalf("defaults: %d queues of depth %d", c.Queues, c.Depth)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"size 0", func(c *Config) { c.Size = 0 }, "size 0"},
		{"negative size", func(c *Config) { c.Size = -4096 }, "size -4096"},
		{"unaligned size", func(c *Config) { c.Size = 4097 }, "not a multiple"},
		{"depth 0", func(c *Config) { c.Depth = 0 }, "queue depth 0"},
		{"depth 4097", func(c *Config) { c.Depth = 4097 }, "queue depth 4097"},
		{"queues 0", func(c *Config) { c.Queues = 0 }, "queues 0"},
		{"queues 65", func(c *Config) { c.Queues = 65 }, "queues 65"},
		{"logical 1000", func(c *Config) { c.LogicalBlockSize = 1000 }, "logical block size 1000"},
		{"logical 256", func(c *Config) { c.LogicalBlockSize = 256 }, "logical block size 256"},
		{"logical 8192", func(c *Config) { c.LogicalBlockSize, c.PhysicalBlockSize = 8192, 8192 }, "logical block size 8192"},
		{"physical 3000", func(c *Config) { c.PhysicalBlockSize = 3000 }, "physical block size 3000"},
		{"physical < logical", func(c *Config) { c.LogicalBlockSize, c.PhysicalBlockSize = 4096, 512 }, "smaller than the logical"},
		{"max io 0", func(c *Config) { c.MaxIOSize = 0 }, "max I/O size 0"},
		{"max io 64M", func(c *Config) { c.MaxIOSize = 64 << 20 }, "max I/O size 67108864"},
		{"fua without cache", func(c *Config) { c.VolatileCache, c.FUA = false, true }, "FUA needs VolatileCache"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig(64 << 20)
			tc.mutate(&c)
			err := c.Validate()
			if err == nil {
				t.Fatal("Validate accepted it")
			}
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want ErrInvalidConfig mentioning %q", err, tc.want)
			}
		})
	}
}

func TestConfigValidateReportsAll(t *testing.T) {
	c := Config{}
	err := c.Validate()
	for _, want := range []string{"logical block size", "physical block size", "size 0", "queues 0", "queue depth 0", "max I/O size"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("zero Config: error %v does not mention %q", err, want)
		}
	}
}

func TestKernelParams(t *testing.T) {
	c := DefaultConfig(1 << 30)
	c.LogicalBlockSize, c.PhysicalBlockSize = 4096, 4096
	c.Discard = true
	p := c.kernelParams()
	if p.Len != 152 || p.Types != paramTypeBasic|paramTypeDiscard {
		t.Fatalf("len %d types %#x", p.Len, p.Types)
	}
	b := p.Basic
	if b.LogicalBSShift != 12 || b.PhysicalBSShift != 12 || b.DevSectors != 1<<21 || b.MaxSectors != uint32(c.MaxIOSize>>9) {
		t.Fatalf("basic %+v", b)
	}
	if b.Attrs != attrVolatileCache|attrFUA {
		t.Fatalf("attrs %#x", b.Attrs)
	}
	if p.Discard.DiscardGranularity != 4096 || p.Discard.MaxDiscardSegments != 1 || p.Discard.MaxDiscardSectors == 0 || p.Discard.MaxWriteZeroesSectors != 0 {
		t.Fatalf("discard %+v", p.Discard)
	}
	c.Discard, c.WriteZeroes, c.VolatileCache, c.FUA, c.ReadOnly = false, true, false, false, true
	p = c.kernelParams()
	if p.Discard.MaxDiscardSectors != 0 || p.Discard.MaxWriteZeroesSectors == 0 || p.Basic.Attrs != attrReadOnly {
		t.Fatalf("write-zeroes only, read-only: %+v attrs %#x", p.Discard, p.Basic.Attrs)
	}
}
