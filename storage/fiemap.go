package storage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FIEMAP (linux/fiemap.h), which golang.org/x/sys does not define.
const (
	fsIocFiemap        = 0xc020660b // _IOWR('f', 11, struct fiemap)
	fiemapFlagSync     = 0x1        // write back dirty data first
	fiemapExtentLast   = 0x1
	fiemapExtentUnknwn = 0x2 // location not known (not allocated yet)
	fiemapHeaderSize   = 32
	fiemapExtentSize   = 56
	fiemapBatch        = 256 // extents asked for per call
)

// FileExtents returns where the data of f lives on the device holding its
// filesystem, in sectors (rounded out), as FIEMAP reports it after writing
// back f's dirty data. Holes have no extent.
func FileExtents(f *os.File) ([]Range, error) {
	buf := make([]uint64, (fiemapHeaderSize+fiemapBatch*fiemapExtentSize)/8)
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), len(buf)*8)
	le := binary.NativeEndian
	var out []Range
	for start := uint64(0); ; {
		clear(raw)
		le.PutUint64(raw[0:], start)
		le.PutUint64(raw[8:], ^uint64(0))
		le.PutUint32(raw[16:], fiemapFlagSync)
		le.PutUint32(raw[24:], fiemapBatch)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			return nil, fmt.Errorf("extents of %s: FIEMAP: %w", f.Name(), errno)
		}
		n := le.Uint32(raw[20:])
		if n == 0 {
			return out, nil
		}
		for i := range n {
			e := raw[fiemapHeaderSize+int(i)*fiemapExtentSize:]
			logical, physical, length := le.Uint64(e[0:]), le.Uint64(e[8:]), le.Uint64(e[16:])
			flags := le.Uint32(e[40:])
			if flags&fiemapExtentUnknwn != 0 {
				return nil, fmt.Errorf("extents of %s: %w", f.Name(), errors.New("an extent has no known location"))
			}
			first, end := physical>>SectorShift, (physical+length+SectorSize-1)>>SectorShift
			out = append(out, Range{Start: int64(first), Count: int64(end - first)})
			start = logical + length
			if flags&fiemapExtentLast != 0 {
				return out, nil
			}
		}
	}
}
