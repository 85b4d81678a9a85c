package storage

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// memPageSize is the allocation unit of a MemDevice.
const memPageSize = 4096

// MemDevice is a sparse in-memory Device for tests and examples. Pages that
// were never written read as zeros and take no memory, so a MemDevice can
// stand for a device of terabytes. It implements Discarder, ZeroWriter and
// Grower; discard and write-zeroes drop the pages they cover completely.
type MemDevice struct {
	name string // Name; immutable

	mu    sync.RWMutex                 // guards the fields below
	geo   Geometry                     // geometry; Size grows with Grow
	pages map[int64]*[memPageSize]byte // written pages by page number
}

var (
	_ Device       = (*MemDevice)(nil)
	_ Discarder    = (*MemDevice)(nil)
	_ ZeroWriter   = (*MemDevice)(nil)
	_ Grower       = (*MemDevice)(nil)
	_ NoWaitReader = (*MemDevice)(nil)
)

// NewMemDevice returns an empty MemDevice with the given geometry. Zero
// block sizes default to 512 bytes.
func NewMemDevice(name string, geo Geometry) *MemDevice {
	if geo.LogicalBlockSize == 0 {
		geo.LogicalBlockSize = SectorSize
	}
	if geo.PhysicalBlockSize == 0 {
		geo.PhysicalBlockSize = geo.LogicalBlockSize
	}
	if geo.MinIOSize == 0 {
		geo.MinIOSize = geo.LogicalBlockSize
	}
	return &MemDevice{name: name, geo: geo, pages: make(map[int64]*[memPageSize]byte)}
}

// Name returns the name given to NewMemDevice.
func (d *MemDevice) Name() string { return d.name }

// Geometry returns the device's geometry.
func (d *MemDevice) Geometry() Geometry {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.geo
}

// checkRange reports an error for a range outside the device; d.mu must be
// held.
func (d *MemDevice) checkRangeLocked(op string, off, n int64) error {
	if off < 0 || n < 0 || off+n > d.geo.Size {
		return fmt.Errorf("%s %s [%d+%d] beyond size %d: %w", op, d.name, off, n, d.geo.Size, unix.EINVAL)
	}
	return nil
}

// ReadAt copies len(p) bytes at off into p.
func (d *MemDevice) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.checkRangeLocked("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		pg, in := pos/memPageSize, int(pos%memPageSize)
		n := min(len(p)-done, memPageSize-in)
		if page := d.pages[pg]; page != nil {
			copy(p[done:done+n], page[in:])
		} else {
			clear(p[done : done+n])
		}
		done += n
	}
	return len(p), nil
}

// WriteAt copies p to off.
func (d *MemDevice) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkRangeLocked("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		pg, in := pos/memPageSize, int(pos%memPageSize)
		n := min(len(p)-done, memPageSize-in)
		page := d.pages[pg]
		if page == nil {
			page = new([memPageSize]byte)
			d.pages[pg] = page
		}
		copy(page[in:], p[done:done+n])
		done += n
	}
	return len(p), nil
}

// Discard zeroes the range (dropping whole pages).
func (d *MemDevice) Discard(off, n int64) error { return d.WriteZeroes(off, n) }

// WriteZeroes zeroes n bytes at off, dropping the pages it covers.
func (d *MemDevice) WriteZeroes(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.checkRangeLocked("write zeroes", off, n); err != nil {
		return err
	}
	for pos, end := off, off+n; pos < end; {
		pg, in := pos/memPageSize, pos%memPageSize
		l := min(end-pos, memPageSize-in)
		if page := d.pages[pg]; page != nil {
			if l == memPageSize {
				delete(d.pages, pg)
			} else {
				clear(page[in : in+l])
			}
		}
		pos += l
	}
	return nil
}

// ReadAtNoWait is ReadAt: memory never waits.
func (d *MemDevice) ReadAtNoWait(p []byte, off int64) (int, error) { return d.ReadAt(p, off) }

// Grow raises the size to size bytes.
func (d *MemDevice) Grow(size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.geo.Size = max(d.geo.Size, size)
	return nil
}

// Pages returns the number of pages holding data (for memory checks).
func (d *MemDevice) Pages() int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return len(d.pages)
}

// Close does nothing; the contents stay readable.
func (d *MemDevice) Close() error { return nil }
