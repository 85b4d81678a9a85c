package main

import (
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/sys/unix"
)

// progress shows how far a long copy is: a bar on standard error when it
// is a terminal, one JSON line per second on standard output with --json,
// nothing otherwise.
type progress struct {
	total int64     // bytes to do; immutable
	start time.Time // immutable

	bars *mpb.Progress // the terminal's bars, or nil
	bar  *mpb.Bar      // or nil

	mu   sync.Mutex
	enc  *json.Encoder // JSON lines, or nil; guarded by mu
	what string        // immutable
	done int64         // bytes done; guarded by mu
	last time.Time     // when the last JSON line was printed; guarded by mu
}

// progressLine is one JSON progress line.
type progressLine struct {
	Progress string  `json:"progress"` // what is being done
	Done     int64   `json:"done"`     // bytes
	Total    int64   `json:"total"`    // bytes
	Rate     float64 `json:"rate"`     // bytes per second so far
	Left     float64 `json:"left"`     // seconds left at that rate
}

func newProgress(stdout, stderr io.Writer, asJSON bool, what string, total int64) *progress {
	p := &progress{total: total, start: time.Now(), what: what}
	switch {
	case asJSON:
		p.enc = json.NewEncoder(stdout)
	case isTerminal(stderr):
		p.bars = mpb.New(mpb.WithOutput(stderr), mpb.WithWidth(40), mpb.WithRefreshRate(200*time.Millisecond))
		p.bar = p.bars.AddBar(total,
			mpb.PrependDecorators(decor.Name(what+" "), decor.CountersKibiByte("% .1f / % .1f")),
			mpb.AppendDecorators(decor.AverageSpeed(decor.SizeB1024(0), " % .1f"), decor.Name(" left "), decor.AverageETA(decor.ET_STYLE_GO)))
	}
	return p
}

// Set records that done bytes are done.
func (p *progress) Set(done int64) {
	if p.bar != nil {
		p.bar.SetCurrent(done)
	}
	if p.enc == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = done
	if time.Since(p.last) >= time.Second {
		p.printLocked()
	}
}

func (p *progress) printLocked() {
	p.last = time.Now()
	l := progressLine{Progress: p.what, Done: p.done, Total: p.total}
	if secs := time.Since(p.start).Seconds(); secs > 0 {
		l.Rate = float64(p.done) / secs
	}
	if l.Rate > 0 {
		l.Left = float64(p.total-p.done) / l.Rate
	}
	p.enc.Encode(l) //nolint:errcheck // progress only
}

// Finish ends the display.
func (p *progress) Finish() {
	if p.bars != nil {
		p.bar.SetTotal(-1, true)
		p.bars.Wait()
	}
	if p.enc != nil {
		p.mu.Lock()
		p.printLocked()
		p.mu.Unlock()
	}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
