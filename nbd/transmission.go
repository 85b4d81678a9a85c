package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sync"
)

// request is one transmission request.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
}

// transmission reads requests until DISC, the client leaving, or a
// malformed request; workers serve READ and BLOCK_STATUS.
func (c *conn) transmission() error {
	work := make(chan request, c.s.opt.Workers)
	var wg sync.WaitGroup
	var failOnce sync.Once
	var failErr error
	fail := func(err error) { // a reply could not be written: end
		failOnce.Do(func() { failErr = err; c.t.Close() })
	}
	for i := 0; i < c.s.opt.Workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range work {
				if err := c.serveRequest(r); err != nil {
					fail(err)
				}
			}
		}()
	}
	err := c.readRequests(work)
	close(work)
	wg.Wait()
	if failErr != nil {
		return failErr
	}
	return err
}

// readRequests parses requests, answers the simple ones itself and hands
// READ and BLOCK_STATUS to the workers.
func (c *conn) readRequests(work chan<- request) error {
	var h [28]byte
	for {
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return errClientLeft // gone without DISC
			}
			return fmt.Errorf("request header: %w", err)
		}
		if m := binary.BigEndian.Uint32(h[:4]); m != magicRequest {
			return fmt.Errorf("request magic %#x", m)
		}
		r := request{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]), off: binary.BigEndian.Uint64(h[16:]), length: binary.BigEndian.Uint32(h[24:])}
		const known = cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero
		if r.typ == cmdWrite {
			// The payload follows whatever the answer: skip it, or give
			// up on a client that would send more than it may.
			if r.length > maxPayload {
				return fmt.Errorf("WRITE of %d bytes (at most %d)", r.length, maxPayload)
			}
			if _, err := c.r.Discard(int(r.length)); err != nil {
				return fmt.Errorf("WRITE payload: %w", err)
			}
		}
		var errno uint32
		switch {
		case r.flags&^known != 0:
			errno = errInvalid
		case r.typ == cmdDisc:
			return errClientLeft
		case r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes:
			errno = errPerm
		case r.typ == cmdFlush:
		case r.typ == cmdRead || r.typ == cmdBlockStatus:
			errno = c.check(r)
			if errno != 0 {
				break
			}
			if r.typ == cmdRead && !c.s.budget.acquire(int64(r.length)) {
				return errClientLeft // the server is closing
			}
			work <- r
			continue
		default:
			errno = errInvalid
		}
		if err := c.reply(r, errno, "", nil); err != nil {
			return err
		}
	}
}

// check validates a READ or BLOCK_STATUS request.
func (c *conn) check(r request) uint32 {
	size := uint64(c.export.Size)
	switch {
	case r.length == 0 || r.off > size || uint64(r.length) > size-r.off:
		return errInvalid
	case r.typ == cmdRead && r.length > maxPayload:
		return errInvalid
	case r.typ == cmdBlockStatus && (!c.structured || len(c.contexts) == 0):
		return errInvalid
	}
	return 0
}

// serveRequest serves a checked READ or BLOCK_STATUS.
func (c *conn) serveRequest(r request) error {
	if r.typ == cmdBlockStatus {
		return c.blockStatus(r)
	}
	defer c.s.budget.release(int64(r.length))
	buf := c.s.buffers.get(int(r.length))
	defer c.s.buffers.put(buf)
	if _, err := c.export.Data.ReadAt(buf, int64(r.off)); err != nil {
		c.log.Warn("nbd: read failed", "export", c.export.Name, "offset", r.off, "length", r.length, "err", err)
		return c.reply(r, errIO, err.Error(), nil)
	}
	return c.reply(r, 0, "", buf)
}

// reply sends the single reply of r: an error (errno ≠ 0), READ data, or
// plain success. With structured replies it is one chunk with DONE.
func (c *conn) reply(r request, errno uint32, msg string, data []byte) error {
	if !c.structured {
		h := binary.BigEndian.AppendUint32(make([]byte, 0, 16), magicSimple)
		h = binary.BigEndian.AppendUint32(h, errno)
		h = binary.BigEndian.AppendUint64(h, r.cookie)
		if errno != 0 {
			data = nil
		}
		return c.write(h, data)
	}
	switch {
	case errno != 0:
		msg = msg[:min(len(msg), maxStringLength)]
		p := binary.BigEndian.AppendUint32(nil, errno)
		p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
		return c.write(chunkHeader(r.cookie, replyFlagDone, chunkError, len(p)+len(msg)), p, []byte(msg))
	case r.typ == cmdRead:
		off := binary.BigEndian.AppendUint64(nil, r.off)
		return c.write(chunkHeader(r.cookie, replyFlagDone, chunkOffsetData, 8+len(data)), off, data)
	}
	return c.write(chunkHeader(r.cookie, replyFlagDone, chunkNone, 0))
}

func chunkHeader(cookie uint64, flags, typ uint16, length int) []byte {
	h := binary.BigEndian.AppendUint32(make([]byte, 0, 20), magicStructured)
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, typ)
	h = binary.BigEndian.AppendUint64(h, cookie)
	return binary.BigEndian.AppendUint32(h, uint32(length))
}

// maxExtentLength is the longest extent a reply can carry, a multiple of
// the minimum block size.
const maxExtentLength = (1<<32 - 1) &^ (minBlock - 1)

// blockStatus sends one BLOCK_STATUS chunk per selected context, the last
// with DONE, all in one write.
func (c *conn) blockStatus(r request) error {
	var bufs [][]byte
	for i, sel := range c.contexts {
		ext, err := sel.status(int64(r.off), int64(r.length))
		p := binary.BigEndian.AppendUint32(nil, sel.id)
		p = appendExtents(p, ext, uint64(c.export.Size)-r.off, uint64(r.length), r.flags&cmdFlagReqOne != 0)
		if err == nil && len(p) == 4 {
			err = errors.New("no extent")
		}
		if err != nil {
			c.log.Warn("nbd: block status failed", "export", c.export.Name, "offset", r.off, "err", err)
			return c.reply(r, errIO, err.Error(), nil)
		}
		flags := uint16(0)
		if i == len(c.contexts)-1 {
			flags = replyFlagDone
		}
		bufs = append(bufs, chunkHeader(r.cookie, flags, chunkBlockStatus, len(p)), p)
	}
	return c.write(bufs...)
}

// appendExtents appends ext as descriptors to p: lengths cut to what is
// left of the export (left) and to maxExtentLength, empty ones dropped,
// at most maxExtents, and with one a single extent of at most length.
func appendExtents(p []byte, ext []Extent, left, length uint64, one bool) []byte {
	n := 0
	for _, e := range ext {
		l := uint64(max(e.Length, 0))
		for l > 0 && left > 0 && n < maxExtents {
			piece := min(l, left, maxExtentLength)
			if one {
				piece = min(piece, length)
			}
			p = binary.BigEndian.AppendUint32(p, uint32(piece))
			p = binary.BigEndian.AppendUint32(p, e.Flags)
			l, left, n = l-piece, left-piece, n+1
			if one {
				return p
			}
		}
	}
	return p
}

// bufferPools recycle READ buffers by size class (powers of two from 4 KiB
// to maxPayload): a fresh buffer per request would be zeroed by the
// runtime each time, which costs as much memory bandwidth as the copy.
type bufferPools [maxBufferShift - minBufferShift + 1]sync.Pool

const (
	minBufferShift = 12
	maxBufferShift = 25 // maxPayload
)

// bufferClass returns the pool index of a buffer of n bytes.
func bufferClass(n int) int {
	return max(bits.Len(uint(n-1)), minBufferShift) - minBufferShift
}

// get returns a buffer of n bytes, 0 < n <= maxPayload.
func (p *bufferPools) get(n int) []byte {
	c := bufferClass(n)
	if b, ok := p[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+minBufferShift))
}

// put recycles a buffer from get.
func (p *bufferPools) put(b []byte) {
	b = b[:cap(b)]
	p[bufferClass(len(b))].Put(&b)
}
