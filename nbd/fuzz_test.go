package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"testing"
	"time"
)

// pipeTransport plays a client that sends in and reads nothing back.
type pipeTransport struct{ in *bytes.Reader }

func (p *pipeTransport) Read(b []byte) (int, error)       { return p.in.Read(b) }
func (p *pipeTransport) Write(b []byte) (int, error)      { return len(b), nil }
func (p *pipeTransport) Close() error                     { return nil }
func (p *pipeTransport) SetWriteDeadline(time.Time) error { return nil }

// FuzzConnection feeds arbitrary client bytes to a connection: whatever
// they are, the connection ends (at the latest when the bytes do) without
// a panic, and the server stays usable.
func FuzzConnection(f *testing.F) {
	hs := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	opt := func(b []byte, o uint32, d []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, magicIHaveOpt)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		return append(b, d...)
	}
	req := func(b []byte, flags, typ uint16, off uint64, n uint32) []byte {
		b = binary.BigEndian.AppendUint32(b, magicRequest)
		b = binary.BigEndian.AppendUint16(b, flags)
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint64(b, 1)
		b = binary.BigEndian.AppendUint64(b, off)
		return binary.BigEndian.AppendUint32(b, n)
	}
	f.Add(hs)
	f.Add(opt(append([]byte{}, hs...), optList, nil))
	f.Add(opt(opt(append([]byte{}, hs...), optInfo, goData("img", infoBlockSize)), optAbort, nil))
	s := opt(opt(append([]byte{}, hs...), optStructuredReply, nil), optSetMetaContext, metaData("img", BaseAllocation, "test:odd"))
	s = opt(s, optListMetaContext, metaData("img", "test:"))
	s = opt(s, optGo, goData("img"))
	s = req(req(req(s, 0, cmdRead, 0, 4096), cmdFlagReqOne, cmdBlockStatus, 512, 9000), 0, cmdFlush, 0, 0)
	f.Add(req(s, 0, cmdDisc, 0, 0))
	x := opt(append([]byte{}, hs...), optExportName, []byte("img"))
	x = req(x, 0, cmdWrite, 0, 8)
	f.Add(append(req(append(x, 1, 2, 3, 4, 5, 6, 7, 8), 0, cmdRead, testSize-1, 2), 0xff))

	data := bytes.Repeat([]byte{0x5a}, testSize)
	e := &Export{Name: "img", Size: testSize, Data: bytes.NewReader(data), Contexts: []string{BaseAllocation, "test:odd"},
		Context: func(name string) MetaContext {
			if name == BaseAllocation {
				return AllData
			}
			if name == "test:odd" {
				return oddBlocks
			}
			return nil
		}}
	srv, err := NewServer([]*Export{e}, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		c := newConn(srv, &pipeTransport{in: bytes.NewReader(in)}, "fuzz")
		done := make(chan struct{})
		go func() { c.serve(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the connection did not end when its input did")
		}
	})
}
