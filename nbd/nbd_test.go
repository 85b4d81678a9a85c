package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/internal/testwait"
)

// testClient speaks the client side of the protocol, byte by byte as the
// protocol document gives it, to check the server against.
type testClient struct {
	t *testing.T
	c net.Conn
}

func (tc *testClient) send(parts ...any) {
	tc.t.Helper()
	var b bytes.Buffer
	for _, p := range parts {
		switch v := p.(type) {
		case string:
			b.WriteString(v)
		case []byte:
			b.Write(v)
		default:
			binary.Write(&b, binary.BigEndian, v)
		}
	}
	tc.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := tc.c.Write(b.Bytes()); err != nil {
		tc.t.Fatalf("send: %v", err)
	}
}

func (tc *testClient) read(n int) []byte {
	tc.t.Helper()
	b := make([]byte, n)
	tc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(tc.c, b); err != nil {
		tc.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (tc *testClient) u16() uint16 { return binary.BigEndian.Uint16(tc.read(2)) }
func (tc *testClient) u32() uint32 { return binary.BigEndian.Uint32(tc.read(4)) }
func (tc *testClient) u64() uint64 { return binary.BigEndian.Uint64(tc.read(8)) }

// closed reports whether the server ended the connection.
func (tc *testClient) closed() bool {
	tc.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := tc.c.Read(make([]byte, 1))
	// A reset: the server closed with bytes of ours unread.
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET)
}

// option sends an option and returns its replies up to the final one.
func (tc *testClient) option(opt uint32, data []byte) (replies []optReply) {
	tc.t.Helper()
	tc.send(uint64(magicIHaveOpt), opt, uint32(len(data)), data)
	for {
		if m := tc.u64(); m != magicOptReply {
			tc.t.Fatalf("option reply magic %#x", m)
		}
		if o := tc.u32(); o != opt {
			tc.t.Fatalf("reply to option %d, sent %d", o, opt)
		}
		r := optReply{typ: tc.u32()}
		r.data = tc.read(int(tc.u32()))
		replies = append(replies, r)
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			return replies
		}
	}
}

type optReply struct {
	typ  uint32
	data []byte
}

func str(s string) []byte { return append(binary.BigEndian.AppendUint32(nil, uint32(len(s))), s...) }

func goData(name string, infos ...uint16) []byte {
	d := binary.BigEndian.AppendUint16(str(name), uint16(len(infos)))
	for _, i := range infos {
		d = binary.BigEndian.AppendUint16(d, i)
	}
	return d
}

func metaData(name string, queries ...string) []byte {
	d := binary.BigEndian.AppendUint32(str(name), uint32(len(queries)))
	for _, q := range queries {
		d = append(d, str(q)...)
	}
	return d
}

// dial connects and does the greeting.
func dial(t *testing.T, addr net.Addr) *testClient {
	t.Helper()
	c, err := net.Dial(addr.Network(), addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	tc := &testClient{t: t, c: c}
	if m := tc.u64(); m != magicNBD {
		t.Fatalf("greeting magic %#x", m)
	}
	if m := tc.u64(); m != magicIHaveOpt {
		t.Fatalf("greeting IHAVEOPT %#x", m)
	}
	if f := tc.u16(); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	tc.send(uint32(flagFixedNewstyle | flagNoZeroes))
	return tc
}

// request sends a transmission request.
func (tc *testClient) request(flags, typ uint16, cookie, off uint64, length uint32) {
	tc.send(uint32(magicRequest), flags, typ, cookie, off, length)
}

// simpleReply reads a simple reply's error, checking the cookie.
func (tc *testClient) simpleReply(cookie uint64) uint32 {
	tc.t.Helper()
	if m := tc.u32(); m != magicSimple {
		tc.t.Fatalf("simple reply magic %#x", m)
	}
	errno := tc.u32()
	if c := tc.u64(); c != cookie {
		tc.t.Fatalf("reply cookie %d, want %d", c, cookie)
	}
	return errno
}

// chunk is a structured reply chunk.
type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (tc *testClient) chunk() chunk {
	tc.t.Helper()
	if m := tc.u32(); m != magicStructured {
		tc.t.Fatalf("structured reply magic %#x", m)
	}
	ch := chunk{flags: tc.u16(), typ: tc.u16(), cookie: tc.u64()}
	ch.payload = tc.read(int(tc.u32()))
	return ch
}

// fixture is a server with one export of random bytes and two contexts:
// base:allocation (all data) and "test:odd" (odd 4 KiB blocks flagged).
type fixture struct {
	data []byte
	srv  *Server
	addr net.Addr
}

const testSize = 1 << 20

func oddBlocks(off, length int64) ([]Extent, error) {
	var ext []Extent
	for pos := off; pos < off+length; {
		end := (pos/4096 + 1) * 4096
		ext = append(ext, Extent{Length: end - pos, Flags: uint32(pos / 4096 % 2)})
		pos = end
	}
	return ext, nil
}

func newFixture(t *testing.T, opt Options) *fixture {
	t.Helper()
	f := &fixture{data: make([]byte, testSize)}
	for i := range f.data {
		f.data[i] = byte(rand.IntN(256))
	}
	e := &Export{Name: "img", Description: "a test image", Size: testSize, Data: bytes.NewReader(f.data),
		Contexts: []string{BaseAllocation, "test:odd"},
		Context: func(name string) MetaContext {
			switch name {
			case BaseAllocation:
				return AllData
			case "test:odd", "test:hidden":
				return oddBlocks
			}
			return nil
		}}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	srv, addr := serveExports(t, []*Export{e, {Name: "other", Size: 4096, Data: bytes.NewReader(make([]byte, 4096))}}, opt)
	return &fixture{data: f.data, srv: srv, addr: addr}
}

// serveExports serves exports on a unix socket until the test ends.
func serveExports(t *testing.T, exports []*Export, opt Options) (*Server, net.Addr) {
	t.Helper()
	srv, err := NewServer(exports, opt)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", t.TempDir()+"/nbd.sock")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return srv, l.Addr()
}

func TestSimpleRepliesAfterGo(t *testing.T) {
	f := newFixture(t, Options{})
	tc := dial(t, f.addr)
	r := tc.option(optGo, goData("img", infoBlockSize, infoName, infoDescription))
	want := map[uint16][]byte{
		infoExport:      binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint64(nil, testSize), transmissionFlags),
		infoName:        []byte("img"),
		infoDescription: []byte("a test image"),
		infoBlockSize:   {0, 0, 2, 0, 0, 0, 16, 0, 2, 0, 0, 0},
	}
	for _, rep := range r[:len(r)-1] {
		if rep.typ != repInfo {
			t.Fatalf("GO reply type %#x", rep.typ)
		}
		it := binary.BigEndian.Uint16(rep.data)
		if !bytes.Equal(rep.data[2:], want[it]) {
			t.Errorf("info %d: %x, want %x", it, rep.data[2:], want[it])
		}
		delete(want, it)
	}
	if len(want) != 0 || r[len(r)-1].typ != repAck {
		t.Fatalf("GO replies %v: missing %v or no ACK", r, want)
	}
	for i, rg := range []struct{ off, n int }{{0, 4096}, {512, 100000}, {testSize - 7, 7}} {
		tc.request(0, cmdRead, uint64(i), uint64(rg.off), uint32(rg.n))
		if e := tc.simpleReply(uint64(i)); e != 0 {
			t.Fatalf("read %v: error %d", rg, e)
		}
		if got := tc.read(rg.n); !bytes.Equal(got, f.data[rg.off:rg.off+rg.n]) {
			t.Fatalf("read %v: data differs", rg)
		}
	}
	// Errors keep the connection: past the end, zero length, writes,
	// unknown commands and flags, block status without contexts.
	for i, rq := range []struct {
		flags, typ uint16
		off        uint64
		n          uint32
		payload    int
		want       uint32
	}{
		{0, cmdRead, testSize - 4096, 8192, 0, errInvalid},
		{0, cmdRead, 1 << 62, 512, 0, errInvalid},
		{0, cmdRead, 0, 0, 0, errInvalid},
		{0, cmdRead, 0, maxPayload + 512, 0, errInvalid},
		{0, cmdWrite, 0, 4096, 4096, errPerm},
		{0, cmdTrim, 0, 4096, 0, errPerm},
		{0, cmdWriteZeroes, 0, 4096, 0, errPerm},
		{0, 99, 0, 4096, 0, errInvalid},
		{1 << 9, cmdRead, 0, 4096, 0, errInvalid},
		{0, cmdBlockStatus, 0, 4096, 0, errInvalid},
		{0, cmdFlush, 0, 0, 0, 0},
	} {
		tc.request(rq.flags, rq.typ, uint64(100+i), rq.off, rq.n)
		tc.send(make([]byte, rq.payload))
		if e := tc.simpleReply(uint64(100 + i)); e != rq.want {
			t.Errorf("request %+v: error %d, want %d", rq, e, rq.want)
		}
	}
	tc.request(0, cmdDisc, 1, 0, 0)
	if !tc.closed() {
		t.Fatal("the connection is still open after DISC")
	}
}

func TestOptions(t *testing.T) {
	f := newFixture(t, Options{})
	tc := dial(t, f.addr)
	r := tc.option(optList, nil)
	if len(r) != 3 || r[0].typ != repServer || !bytes.Equal(r[0].data, append(str("img"), "a test image"...)) ||
		!bytes.Equal(r[1].data, str("other")) || r[2].typ != repAck {
		t.Fatalf("LIST: %v", r)
	}
	for _, c := range []struct {
		opt  uint32
		data []byte
		want uint32
	}{
		{optList, []byte{1}, repErrInvalid},
		{optGo, goData("nope"), repErrUnknown},
		{optInfo, goData("img")[:5], repErrInvalid},
		{optInfo, append(goData("img"), 0), repErrInvalid},
		{optStartTLS, nil, repErrUnsup},
		{11, nil, repErrUnsup}, // EXTENDED_HEADERS
		{4242, []byte("x"), repErrUnsup},
		{optSetMetaContext, metaData("img", BaseAllocation), repErrInvalid}, // before STRUCTURED_REPLY
		{optStructuredReply, []byte{0}, repErrInvalid},
		{optListMetaContext, metaData("nope"), repErrUnknown},
		{optListMetaContext, metaData("img", "x")[:12], repErrInvalid},
	} {
		r := tc.option(c.opt, c.data)
		if got := r[len(r)-1].typ; got != c.want {
			t.Errorf("option %d %x: reply %#x, want %#x", c.opt, c.data, got, c.want)
		}
	}
	if r := tc.option(optInfo, goData("img")); r[len(r)-1].typ != repAck {
		t.Fatalf("INFO after errors: %v", r)
	}
	if r := tc.option(optInfo, goData("")); r[len(r)-1].typ != repErrUnknown {
		t.Fatalf("INFO of the default export of a server with two: %v", r)
	}
	for _, c := range []struct {
		queries []string
		want    string
	}{
		{nil, "[0:base:allocation 0:test:odd]"},
		{[]string{"test:"}, "[0:test:odd]"},
		{[]string{"test:hidden", "nope:x", "base:"}, "[0:test:hidden 0:base:allocation]"},
	} {
		if got := fmt.Sprint(contextNames(tc.option(optListMetaContext, metaData("img", c.queries...)))); got != c.want {
			t.Errorf("LIST_META_CONTEXT %q: %s, want %s", c.queries, got, c.want)
		}
	}
	tc.option(optStructuredReply, nil)
	if got := fmt.Sprint(contextNames(tc.option(optSetMetaContext, metaData("img", "test:odd", "base:", "nope", BaseAllocation)))); got != "[1:test:odd 2:base:allocation]" {
		t.Errorf("SET_META_CONTEXT: %s", got)
	}
	if r := tc.option(optAbort, nil); r[0].typ != repAck || !tc.closed() {
		t.Fatal("ABORT: no ACK or the connection stays open")
	}
}

func TestStructuredReadAndBlockStatus(t *testing.T) {
	f := newFixture(t, Options{})
	tc := dial(t, f.addr)
	tc.option(optStructuredReply, nil)
	tc.option(optSetMetaContext, metaData("img", BaseAllocation, "test:odd"))
	tc.option(optGo, goData("img"))
	tc.request(0, cmdRead, 7, 8192, 12288)
	ch := tc.chunk()
	if ch.typ != chunkOffsetData || ch.flags != replyFlagDone || ch.cookie != 7 ||
		binary.BigEndian.Uint64(ch.payload) != 8192 || !bytes.Equal(ch.payload[8:], f.data[8192:8192+12288]) {
		t.Fatalf("structured read: %+v", ch.typ)
	}
	decode := func(p []byte) (id uint32, ext []Extent) {
		id = binary.BigEndian.Uint32(p)
		for p = p[4:]; len(p) >= 8; p = p[8:] {
			ext = append(ext, Extent{Length: int64(binary.BigEndian.Uint32(p)), Flags: binary.BigEndian.Uint32(p[4:])})
		}
		return id, ext
	}
	tc.request(0, cmdBlockStatus, 8, 2048, 10000)
	a, b := tc.chunk(), tc.chunk()
	if a.typ != chunkBlockStatus || a.flags != 0 || b.typ != chunkBlockStatus || b.flags != replyFlagDone {
		t.Fatalf("block status chunks %+v %+v", a, b)
	}
	if id, ext := decode(a.payload); id != 1 || fmt.Sprint(ext) != "[{10000 0}]" {
		t.Errorf("base:allocation: id %d %v", id, ext)
	}
	if id, ext := decode(b.payload); id != 2 || fmt.Sprint(ext) != "[{2048 0} {4096 1} {4096 0}]" {
		t.Errorf("test:odd: id %d %v", id, ext)
	}
	tc.request(cmdFlagReqOne, cmdBlockStatus, 9, 4096, 100)
	tc.chunk()
	if _, ext := decode(tc.chunk().payload); fmt.Sprint(ext) != "[{100 1}]" {
		t.Errorf("REQ_ONE: %v", ext)
	}
	tc.request(0, cmdBlockStatus, 10, testSize-4096, 8192)
	if ch := tc.chunk(); ch.typ != chunkError || binary.BigEndian.Uint32(ch.payload) != errInvalid {
		t.Errorf("block status past the end: %+v", ch)
	}
	tc.request(0, cmdFlush, 11, 0, 0)
	if ch := tc.chunk(); ch.typ != chunkNone || ch.flags != replyFlagDone || ch.cookie != 11 {
		t.Errorf("flush: %+v", ch)
	}
}

// TestMalformedEndsOnlyThatConnection: each bad message ends its
// connection; the server goes on serving.
func TestMalformedEndsOnlyThatConnection(t *testing.T) {
	f := newFixture(t, Options{})
	for name, bad := range map[string]func(tc *testClient){
		"unknown client flags": func(tc *testClient) {},
		"option magic":         func(tc *testClient) { tc.send(uint64(1), uint32(optList), uint32(0)) },
		"oversized option":     func(tc *testClient) { tc.send(uint64(magicIHaveOpt), uint32(optList), uint32(1<<30)) },
		"truncated option": func(tc *testClient) {
			tc.send(uint64(magicIHaveOpt), uint32(optGo), uint32(100), "img")
			tc.c.(*net.UnixConn).CloseWrite()
		},
		"EXPORT_NAME unknown": func(tc *testClient) { tc.send(uint64(magicIHaveOpt), uint32(optExportName), uint32(4), "nope") },
		"request magic": func(tc *testClient) {
			tc.option(optGo, goData("img"))
			tc.send(uint32(0xdeadbeef), make([]byte, 24))
		},
		"oversized write": func(tc *testClient) {
			tc.option(optGo, goData("img"))
			tc.request(0, cmdWrite, 1, 0, maxPayload+1)
		},
	} {
		t.Run(name, func(t *testing.T) {
			tc := dial(t, f.addr)
			if name == "unknown client flags" {
				tc.c.Close()
				c, _ := net.Dial("unix", f.addr.String())
				tc = &testClient{t: t, c: c}
				tc.read(18)
				tc.send(uint32(1 << 5))
			}
			bad(tc)
			if !tc.closed() {
				t.Fatal("the connection stays open")
			}
		})
	}
	tc := dial(t, f.addr)
	tc.send(uint64(magicIHaveOpt), uint32(optExportName), uint32(3), "img")
	if size, flags := tc.u64(), tc.u16(); size != testSize || flags != transmissionFlags {
		t.Fatalf("EXPORT_NAME: size %d flags %#x", size, flags)
	}
	tc.request(0, cmdRead, 1, 0, 512)
	if tc.simpleReply(1) != 0 || !bytes.Equal(tc.read(512), f.data[:512]) {
		t.Fatal("read after the bad connections")
	}
}

// TestStuckClientDoesNotBlockOthers: a client that sends reads and never
// takes the replies is dropped after the write timeout; meanwhile 8 other
// clients read the whole export, concurrently, within a small buffer
// budget.
func TestStuckClientDoesNotBlockOthers(t *testing.T) {
	f := newFixture(t, Options{MaxBuffered: 32 << 20, WriteTimeout: 500 * time.Millisecond})
	stuck := dial(t, f.addr)
	stuck.option(optGo, goData("img"))
	for i := 0; i < 64; i++ {
		stuck.request(0, cmdRead, uint64(i), 0, testSize)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for k := 0; k < 8; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("unix", f.addr.String())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			tc := &testClient{t: t, c: c}
			tc.read(18)
			tc.send(uint32(flagFixedNewstyle | flagNoZeroes))
			tc.option(optGo, goData("img"))
			const n = 64 << 10
			for off := 0; off < testSize; off += n {
				tc.request(0, cmdRead, uint64(off), uint64(off), n)
			}
			got := make([]byte, testSize)
			for i := 0; i < testSize/n; i++ {
				tc.u32()
				if e := tc.u32(); e != 0 {
					errs <- fmt.Errorf("read error %d", e)
					return
				}
				off := tc.u64()
				copy(got[off:], tc.read(n))
			}
			if !bytes.Equal(got, f.data) {
				errs <- errors.New("data differs")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// The stuck client never took its replies for longer than the write
	// timeout: the server drops it (and the others, which hung up), so
	// reading what the socket still holds ends with EOF.
	testwait.For(t, "the server to drop the stuck client", func() bool {
		f.srv.mu.Lock()
		defer f.srv.mu.Unlock()
		return len(f.srv.conns) == 0
	})
	stuck.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, stuck.c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) { // reset: requests were left unread
		t.Fatalf("the stuck client was not dropped: %v", err)
	}
	if n >= 64*testSize {
		t.Fatalf("the stuck client got all %d bytes of its replies", n)
	}
}

// TestCloseEndsConnections: Close returns once every connection ended,
// with clients in the middle of a handshake and of transmission.
func TestCloseEndsConnections(t *testing.T) {
	f := newFixture(t, Options{})
	a := dial(t, f.addr)
	b := dial(t, f.addr)
	b.option(optGo, goData("img"))
	done := make(chan struct{})
	go func() { f.srv.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs")
	}
	if !a.closed() || !b.closed() {
		t.Fatal("connections stay open after Close")
	}
	l, err := net.Listen("unix", t.TempDir()+"/late.sock")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.srv.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

func TestNewServerRefusesBadExports(t *testing.T) {
	r := bytes.NewReader(nil)
	for _, e := range [][]*Export{
		{{Name: "", Size: 1, Data: r}},
		{{Name: "a", Size: 0, Data: r}},
		{{Name: "a", Size: 1}},
		{{Name: "a", Size: 1, Data: r}, {Name: "a", Size: 1, Data: r}},
	} {
		if _, err := NewServer(e, Options{}); !errors.Is(err, ErrInvalidExport) {
			t.Errorf("NewServer(%+v): %v", e, err)
		}
	}
}

func TestBufferPools(t *testing.T) {
	var p bufferPools
	for _, n := range []int{1, 4095, 4096, 4097, 65536, 100000, maxPayload} {
		b := p.get(n)
		if len(b) != n || cap(b) < n || cap(b)&(cap(b)-1) != 0 {
			t.Fatalf("get(%d): len %d cap %d", n, len(b), cap(b))
		}
		p.put(b)
		if b2 := p.get(n); len(b2) != n {
			t.Fatalf("get(%d) after put: len %d", n, len(b2))
		}
	}
}

func TestDefaultExport(t *testing.T) {
	_, addr := serveExports(t, []*Export{{Name: "only", Size: 4096, Data: bytes.NewReader(make([]byte, 4096))}},
		Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	tc := dial(t, addr)
	r := tc.option(optGo, goData(""))
	if r[len(r)-1].typ != repAck || binary.BigEndian.Uint64(r[0].data[2:]) != 4096 {
		t.Fatalf("GO of the default export: %v", r)
	}
}

// A selection of metadata contexts made under the empty name, the default
// export's other name (as nbdcopy makes it with nbd+unix:///?socket=),
// applies when GO names the export in either way.
func TestBlockStatusDefaultExport(t *testing.T) {
	for _, goName := range []string{"", "only"} {
		e := &Export{Name: "only", Size: 8192, Data: bytes.NewReader(make([]byte, 8192)), Contexts: []string{BaseAllocation},
			Context: func(name string) MetaContext {
				if name != BaseAllocation {
					return nil
				}
				return func(off, length int64) ([]Extent, error) { return []Extent{{Length: length}}, nil }
			}}
		_, addr := serveExports(t, []*Export{e}, Options{})
		tc := dial(t, addr)
		tc.option(optStructuredReply, nil)
		if got := fmt.Sprint(contextNames(tc.option(optSetMetaContext, metaData("", BaseAllocation)))); got != "[1:base:allocation]" {
			t.Fatalf("SET_META_CONTEXT under the empty name: %s", got)
		}
		tc.option(optGo, goData(goName))
		tc.request(0, cmdBlockStatus, 1, 0, 8192)
		if ch := tc.chunk(); ch.typ != chunkBlockStatus || binary.BigEndian.Uint32(ch.payload) != 1 {
			t.Errorf("GO %q: BLOCK_STATUS answered chunk type %d, payload %x; want the status of context 1", goName, ch.typ, ch.payload)
		}
	}
}

// contextNames returns the "id:name" of the META_CONTEXT replies of r, an
// option's replies ending in its ACK.
func contextNames(r []optReply) (out []string) {
	for _, rep := range r[:len(r)-1] {
		out = append(out, fmt.Sprintf("%d:%s", binary.BigEndian.Uint32(rep.data), rep.data[4:]))
	}
	return out
}
