package cbt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
)

// A saved map is a header, the write map, the read map and a CRC-32C of
// all that precedes it:
//
//	magic      8 bytes "UBSNCBT1"
//	shift      1 byte
//	active     1 byte
//	previous   1 byte
//	pad        5 bytes, zero
//	capacity   8 bytes, little endian
//	generation 16 bytes
//	write map, read map: blocks(capacity, shift) bytes each
//	crc32c     4 bytes, little endian
const (
	savedMagic  = "UBSNCBT1"
	headerSize  = 40
	trailerSize = 4
)

// ErrBadSave reports a saved map that is damaged or not a map.
var ErrBadSave = errors.New("not a saved change tracking map")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MarshalBinary saves the map. A corrupted map is not saved: its history
// is already lost.
func (m *Map) MarshalBinary() ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.corrupted.Load() {
		return nil, errors.New("save change tracking map: it is corrupted")
	}
	b := make([]byte, headerSize, headerSize+2*m.write.n+trailerSize)
	copy(b, savedMagic)
	b[8], b[9], b[10] = byte(m.shift), byte(m.active.Load()), m.previous
	binary.LittleEndian.PutUint64(b[16:], uint64(m.capacity))
	copy(b[24:40], m.generation[:])
	b = append(b, m.write.bytes()...)
	b = append(b, m.read...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli)), nil
}

// Load returns the map saved in b. It fails with ErrBadSave if b is
// damaged and when the saved map is of a device of another capacity or
// was sized with other parameters: the caller then starts a new map.
func Load(b []byte, capacity int64, p Params) (*Map, error) {
	if len(b) < headerSize+trailerSize || string(b[:8]) != savedMagic {
		return nil, fmt.Errorf("%w: no header", ErrBadSave)
	}
	body := b[:len(b)-trailerSize]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(b[len(body):]) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrBadSave)
	}
	m := &Map{shift: uint(b[8]), previous: b[10], capacity: int64(binary.LittleEndian.Uint64(b[16:]))}
	m.active.Store(uint32(b[9]))
	copy(m.generation[:], b[24:40])
	if m.capacity != capacity {
		return nil, fmt.Errorf("%w: saved for %d bytes, the device has %d", ErrBadSave, m.capacity, capacity)
	}
	if want := p.BlockShift(capacity); m.shift != want {
		return nil, fmt.Errorf("%w: blocks of 2^%d bytes, the parameters give 2^%d", ErrBadSave, m.shift, want)
	}
	n := blocks(capacity, m.shift)
	if int64(len(body)-headerSize) != 2*n || b[9] == 0 || m.previous >= b[9] || slices.ContainsFunc(b[11:16], nonZero) {
		return nil, fmt.Errorf("%w: inconsistent", ErrBadSave)
	}
	maps := body[headerSize:]
	// No block was written in an interval after the active one, nor read
	// in one after the last take's.
	if slices.ContainsFunc(maps[:n], func(v byte) bool { return v > b[9] }) ||
		slices.ContainsFunc(maps[n:], func(v byte) bool { return v > m.previous }) {
		return nil, fmt.Errorf("%w: a block changed in an interval that has not begun", ErrBadSave)
	}
	m.write = newAtomicBytes(n)
	m.write.set(maps[:n])
	m.read = append([]byte(nil), maps[n:]...)
	return m, nil
}

func nonZero(v byte) bool { return v != 0 }
