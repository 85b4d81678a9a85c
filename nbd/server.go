package nbd

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Options tune a Server; zero fields take the defaults.
type Options struct {
	// MaxBuffered bounds the bytes of READ replies being prepared or sent
	// over all connections (default 64 MiB, at least 32 MiB: one largest
	// READ).
	MaxBuffered int64
	// WriteTimeout drops a client that does not take a reply within it
	// (default 30 s).
	WriteTimeout time.Duration
	// Workers serve each connection's requests concurrently (default 4).
	Workers int
	// Logger receives connection errors; nil means slog.Default().
	Logger *slog.Logger
}

// socketBuffer is the send buffer asked for each connection.
const socketBuffer = 4 << 20

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves a fixed set of exports on any number of listeners.
type Server struct {
	exports []*Export          // immutable
	byName  map[string]*Export // immutable
	opt     Options            // immutable, defaults applied
	log     *slog.Logger       // immutable
	budget  *budget            // bytes of READ replies in flight
	buffers bufferPools        // READ buffers

	mu        sync.Mutex
	closed    bool                      // guarded by mu
	listeners map[net.Listener]struct{} // guarded by mu
	conns     map[*conn]struct{}        // guarded by mu
	wg        sync.WaitGroup            // Serve loops and connections
}

// NewServer returns a server of exports, whose names must be unique.
func NewServer(exports []*Export, opt Options) (*Server, error) {
	if opt.MaxBuffered == 0 {
		opt.MaxBuffered = 64 << 20
	}
	opt.MaxBuffered = max(opt.MaxBuffered, maxPayload)
	if opt.WriteTimeout <= 0 {
		opt.WriteTimeout = 30 * time.Second
	}
	if opt.Workers <= 0 {
		opt.Workers = 4
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	s := &Server{exports: exports, byName: map[string]*Export{}, opt: opt, log: opt.Logger,
		budget: newBudget(opt.MaxBuffered), listeners: map[net.Listener]struct{}{}, conns: map[*conn]struct{}{}}
	for _, e := range exports {
		if err := e.validate(); err != nil {
			return nil, err
		}
		if s.byName[e.Name] != nil {
			return nil, fmt.Errorf("%w: two exports named %q", ErrInvalidExport, e.Name)
		}
		s.byName[e.Name] = e
	}
	return s, nil
}

// Serve accepts connections on l until Close, serving each on its own
// goroutines. It closes l and returns ErrServerClosed after Close, or the
// accept error.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			delete(s.listeners, l)
			s.mu.Unlock()
			l.Close()
			if closed {
				return ErrServerClosed
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		// Room for a few whole replies: a reply larger than the socket
		// buffer needs the client to read before writev returns.
		if b, ok := nc.(interface{ SetWriteBuffer(int) error }); ok {
			b.SetWriteBuffer(socketBuffer)
		}
		c := newConn(s, nc, nc.RemoteAddr().String())
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Close stops the listeners, ends every connection and waits until no
// goroutine of the server runs, so that the exports' Data is no longer
// used when it returns.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.t.Close()
	}
	s.mu.Unlock()
	s.budget.close()
	s.wg.Wait()
	return nil
}

// budget is a weighted semaphore of bytes.
type budget struct {
	mu     sync.Mutex
	cond   *sync.Cond
	free   int64 // guarded by mu
	closed bool  // guarded by mu: acquire fails
}

func newBudget(n int64) *budget {
	b := &budget{free: n}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// acquire waits for n bytes; false once closed.
func (b *budget) acquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.free < n && !b.closed {
		b.cond.Wait()
	}
	if b.closed {
		return false
	}
	b.free -= n
	return true
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.free += n
	b.mu.Unlock()
	b.cond.Broadcast()
}

func (b *budget) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}

// lookup finds an export by name; the empty name is the default export,
// which exists when there is only one.
func (s *Server) lookup(name string) *Export {
	if name == "" && len(s.exports) == 1 {
		return s.exports[0]
	}
	return s.byName[name]
}
