package ublk

import (
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"
)

// bufPool hands out the data buffers of a user-copy queue: anonymous
// mappings in power-of-two size classes from a page to the queue's
// largest request, at most limit bytes mapped in all. A buffer given back
// stays mapped in its class's free list for the next request of that
// class; when a request needs a class with no free buffer and the limit is
// reached, free buffers of other classes are unmapped to make room, and
// when buffers in use hold the whole limit, get says so and the request
// waits. So the memory of a queue is bounded by limit whatever the mix of
// sizes, and a warm pool serves every request without a system call or an
// allocation. Owned by the queue goroutine: no locks.
type bufPool struct {
	limit  int        // bytes that may be mapped at once; at least the largest class
	mapped int        // bytes mapped now, free or in use
	free   [][][]byte // free[c]: mapped buffers of pageSize<<c bytes not in use
}

// newBufPool returns a pool for requests of up to maxIO bytes with at
// most limit bytes mapped (raised to the largest class if smaller).
func newBufPool(maxIO, limit int) *bufPool {
	top := sizeClass(maxIO)
	p := &bufPool{limit: max(limit, pageSize<<top), free: make([][][]byte, top+1)}
	for c := range p.free {
		// Room for every buffer the limit allows: put never allocates.
		p.free[c] = make([][]byte, 0, p.limit/(pageSize<<c))
	}
	return p
}

// sizeClass is the class of a buffer of n bytes: log2 of n in pages,
// rounded up.
func sizeClass(n int) int {
	pages := (n + pageSize - 1) / pageSize
	if pages <= 1 {
		return 0
	}
	return bits.Len(uint(pages - 1))
}

// get returns a buffer of at least n bytes (its length is its class's
// size), or nil when the buffers in use leave no room for it.
func (p *bufPool) get(n int) ([]byte, error) {
	c := sizeClass(n)
	if c >= len(p.free) {
		return nil, fmt.Errorf("ublk: buffer of %d bytes: larger than the pool's largest class", n)
	}
	if l := p.free[c]; len(l) > 0 {
		b := l[len(l)-1]
		p.free[c] = l[:len(l)-1]
		return b, nil
	}
	size := pageSize << c
	for o := len(p.free) - 1; o >= 0 && p.mapped+size > p.limit; o-- {
		for l := p.free[o]; len(l) > 0 && p.mapped+size > p.limit; l = p.free[o] {
			p.unmap(l[len(l)-1])
			p.free[o] = l[:len(l)-1]
		}
	}
	if p.mapped+size > p.limit {
		return nil, nil
	}
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("ublk: mmap a %d-byte request buffer: %w", size, err)
	}
	p.mapped += size
	return b, nil
}

// put gives back a buffer get returned.
func (p *bufPool) put(b []byte) {
	c := sizeClass(len(b))
	p.free[c] = append(p.free[c], b)
}

// unmap unmaps one buffer.
func (p *bufPool) unmap(b []byte) {
	p.mapped -= len(b)
	_ = unix.Munmap(b) // only a bad address fails, and b is ours
}

// close unmaps every free buffer; buffers in use must have been put back.
func (p *bufPool) close() {
	for c, l := range p.free {
		for _, b := range l {
			p.unmap(b)
		}
		p.free[c] = l[:0]
	}
}
