package cbt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"
)

// FuzzLoad feeds Load saved maps with any body under a valid checksum (a
// random one would stop at the checksum): it never panics, fails only with
// ErrBadSave, and a map it accepts saves to the same bytes.
func FuzzLoad(f *testing.F) {
	const capacity = 1<<20 + 512
	p := Params{MinShift: 16, MaxShift: 20, MaxCount: 1 << 20}
	m := New(capacity, p)
	m.Mark(4096, 8192)
	m.Switch()
	m.Mark(1<<20, 512)
	saved, err := m.MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(saved[:len(saved)-trailerSize])
	f.Add([]byte(savedMagic))
	f.Fuzz(func(t *testing.T, body []byte) {
		b := binary.LittleEndian.AppendUint32(bytes.Clone(body), crc32.Checksum(body, castagnoli))
		m, err := Load(b, capacity, p)
		if err != nil {
			if !errors.Is(err, ErrBadSave) {
				t.Fatalf("Load failed with %v, not ErrBadSave", err)
			}
			return
		}
		again, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("a loaded map does not save: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("a loaded map saves to other bytes")
		}
	})
}

// FuzzParsePoint: ParsePoint never panics, and a point it accepts prints
// to a string it parses to the same point.
func FuzzParsePoint(f *testing.F) {
	f.Add("0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a:7")
	f.Add(":")
	f.Add("0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a:256")
	f.Fuzz(func(t *testing.T, s string) {
		pt, err := ParsePoint(s)
		if err != nil {
			return
		}
		if again, err := ParsePoint(pt.String()); err != nil || again != pt {
			t.Fatalf("%q parses to %v, whose string %q parses to %v, %v", s, pt, pt.String(), again, err)
		}
	})
}
