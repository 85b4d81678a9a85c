package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"
)

// transport is what a connection needs of its net.Conn (a TLS layer
// would wrap it here).
type transport interface {
	io.ReadWriteCloser
	SetWriteDeadline(time.Time) error
}

// selected is a metadata context chosen by SET_META_CONTEXT.
type selected struct {
	id     uint32
	status MetaContext
}

// conn is one client connection. Its reader goroutine runs the handshake
// and reads requests; workers serve them.
type conn struct {
	s   *Server
	t   transport
	r   *bufio.Reader // owned by the reader goroutine
	log *slog.Logger

	// Handshake state, owned by the reader goroutine; read-only once
	// transmission starts.
	noZeroes   bool
	structured bool
	export     *Export
	metaFor    *Export    // export the selection was made for (under any of its names)
	contexts   []selected // current selection

	wmu sync.Mutex // serializes replies: each is written whole
}

func newConn(s *Server, t transport, peer string) *conn {
	return &conn{s: s, t: t, r: bufio.NewReaderSize(t, 64<<10), log: s.log.With("nbd_client", peer)}
}

// errClientLeft ends a connection without an error to log.
var errClientLeft = errors.New("client left")

// serve runs the connection to its end and logs why it ended badly.
func (c *conn) serve() {
	defer c.t.Close()
	err := c.handshake()
	if err == nil && c.export != nil {
		err = c.transmission()
	}
	switch {
	case err == nil || errors.Is(err, errClientLeft):
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNRESET):
		c.log.Debug("nbd: connection closed", "err", err)
	default:
		c.log.Warn("nbd: connection ended", "err", err)
	}
}

// write sends bufs as one reply, within the write timeout.
func (c *conn) write(bufs ...[]byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.t.SetWriteDeadline(time.Now().Add(c.s.opt.WriteTimeout))
	if nc, ok := c.t.(net.Conn); ok {
		nb := net.Buffers(bufs)
		_, err := nb.WriteTo(nc)
		return err
	}
	for _, b := range bufs {
		if _, err := c.t.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// handshake runs the fixed newstyle negotiation. It returns with
// c.export set when transmission is to start, nil when the client left
// cleanly (ABORT).
func (c *conn) handshake() error {
	hello := binary.BigEndian.AppendUint64(nil, magicNBD)
	hello = binary.BigEndian.AppendUint64(hello, magicIHaveOpt)
	hello = binary.BigEndian.AppendUint16(hello, flagFixedNewstyle|flagNoZeroes)
	if err := c.write(hello); err != nil {
		return err
	}
	var b [16]byte
	if _, err := io.ReadFull(c.r, b[:4]); err != nil {
		return fmt.Errorf("client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(b[:4])
	if flags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return fmt.Errorf("unknown client flags %#x", flags)
	}
	c.noZeroes = flags&flagNoZeroes != 0
	for {
		if _, err := io.ReadFull(c.r, b[:]); err != nil {
			return fmt.Errorf("option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(b[:8]); m != magicIHaveOpt {
			return fmt.Errorf("option magic %#x", m)
		}
		opt, n := binary.BigEndian.Uint32(b[8:12]), binary.BigEndian.Uint32(b[12:16])
		if n > maxOptionLength {
			return fmt.Errorf("option %d of %d bytes (at most %d)", opt, n, maxOptionLength)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return fmt.Errorf("option %d data: %w", opt, err)
		}
		done, err := c.option(opt, data)
		if err != nil || done {
			return err
		}
	}
}

// option answers one option; done is true when the handshake is over.
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	switch opt {
	case optExportName:
		e := c.s.lookup(string(data))
		if e == nil {
			return true, fmt.Errorf("EXPORT_NAME of unknown export %q", data)
		}
		reply := binary.BigEndian.AppendUint64(nil, uint64(e.Size))
		reply = binary.BigEndian.AppendUint16(reply, transmissionFlags)
		if !c.noZeroes {
			reply = append(reply, make([]byte, 124)...)
		}
		c.start(e)
		return true, c.write(reply)
	case optAbort:
		c.optReply(opt, repAck, nil) // the client may already be gone
		return true, nil
	case optList:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "LIST takes no data")
		}
		for _, e := range c.s.exports {
			d := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			d = append(append(d, e.Name...), e.Description...)
			if err := c.optReply(opt, repServer, d); err != nil {
				return false, err
			}
		}
		return false, c.optReply(opt, repAck, nil)
	case optInfo, optGo:
		return c.infoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optError(opt, repErrInvalid, "STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return false, c.optReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, c.metaContext(opt, data)
	case optStartTLS:
		return false, c.optError(opt, repErrUnsup, "TLS is not supported")
	}
	return false, c.optError(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
}

// transmissionFlags: read-only, and FLUSH accepted (it has nothing to do),
// so that several connections may share the export (CAN_MULTI_CONN).
const transmissionFlags = tfHasFlags | tfReadOnly | tfSendFlush | tfCanMultiConn

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	h := binary.BigEndian.AppendUint64(make([]byte, 0, 20), magicOptReply)
	h = binary.BigEndian.AppendUint32(h, opt)
	h = binary.BigEndian.AppendUint32(h, typ)
	h = binary.BigEndian.AppendUint32(h, uint32(len(data)))
	return c.write(h, data)
}

func (c *conn) optError(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(msg))
}

// parseString reads a u32-length-prefixed string from d.
func parseString(d []byte) (s string, rest []byte, ok bool) {
	if len(d) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(d)
	if n > maxStringLength || uint64(n) > uint64(len(d)-4) {
		return "", nil, false
	}
	return string(d[4 : 4+n]), d[4+n:], true
}

// infoGo answers INFO and GO: the export, its name, description and block
// sizes as asked, then ACK; GO then starts transmission.
func (c *conn) infoGo(opt uint32, data []byte) (bool, error) {
	name, rest, ok := parseString(data)
	if !ok || len(rest) < 2 {
		return false, c.optError(opt, repErrInvalid, "malformed INFO/GO request")
	}
	n := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*n {
		return false, c.optError(opt, repErrInvalid, "malformed INFO/GO request")
	}
	e := c.s.lookup(name)
	if e == nil {
		return false, c.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	d := binary.BigEndian.AppendUint16(nil, infoExport)
	d = binary.BigEndian.AppendUint64(d, uint64(e.Size))
	d = binary.BigEndian.AppendUint16(d, transmissionFlags)
	if err := c.optReply(opt, repInfo, d); err != nil {
		return false, err
	}
	for i := 0; i < n; i++ {
		var d []byte
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			d = append(binary.BigEndian.AppendUint16(nil, infoName), e.Name...)
		case infoDescription:
			d = append(binary.BigEndian.AppendUint16(nil, infoDescription), e.Description...)
		case infoBlockSize:
			d = binary.BigEndian.AppendUint16(nil, infoBlockSize)
			d = binary.BigEndian.AppendUint32(d, minBlock)
			d = binary.BigEndian.AppendUint32(d, preferredBlock)
			d = binary.BigEndian.AppendUint32(d, maxPayload)
		default:
			continue
		}
		if err := c.optReply(opt, repInfo, d); err != nil {
			return false, err
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optGo {
		c.start(e)
		return true, nil
	}
	return false, nil
}

// start selects e for transmission; a context selection made for another
// export does not apply.
func (c *conn) start(e *Export) {
	c.export = e
	if c.metaFor != e {
		c.contexts = nil
	}
}

// metaContext answers LIST_META_CONTEXT and SET_META_CONTEXT.
func (c *conn) metaContext(opt uint32, data []byte) error {
	name, rest, ok := parseString(data)
	var queries []string
	if ok && len(rest) >= 4 {
		n := binary.BigEndian.Uint32(rest)
		rest = rest[4:]
		for i := uint32(0); i < n && ok; i++ {
			var q string
			q, rest, ok = parseString(rest)
			queries = append(queries, q)
		}
		ok = ok && len(rest) == 0
	} else {
		ok = false
	}
	if !ok {
		return c.optError(opt, repErrInvalid, "malformed META_CONTEXT request")
	}
	if opt == optSetMetaContext && !c.structured {
		return c.optError(opt, repErrInvalid, "SET_META_CONTEXT needs STRUCTURED_REPLY first")
	}
	e := c.s.lookup(name)
	if e == nil {
		return c.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	var names []string
	seen := map[string]bool{}
	add := func(n string) {
		if !seen[n] {
			seen[n] = true
			names = append(names, n)
		}
	}
	switch {
	case opt == optSetMetaContext:
		for _, q := range queries {
			if e.context(q) != nil {
				add(q)
			}
		}
	case len(queries) == 0:
		for _, n := range e.Contexts {
			add(n)
		}
	default:
		for _, q := range queries {
			if strings.HasSuffix(q, ":") {
				for _, n := range e.Contexts {
					if strings.HasPrefix(n, q) {
						add(n)
					}
				}
			} else if e.context(q) != nil {
				add(q)
			}
		}
	}
	if opt == optSetMetaContext {
		c.metaFor, c.contexts = e, nil
	}
	for i, n := range names {
		id := uint32(0)
		if opt == optSetMetaContext {
			id = uint32(i + 1)
			c.contexts = append(c.contexts, selected{id: id, status: e.context(n)})
		}
		d := append(binary.BigEndian.AppendUint32(nil, id), n...)
		if err := c.optReply(opt, repMetaContext, d); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}
