package ublk

import (
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// Run serves req, a request of NewRequest (in copy mode: its Buf holds
// the data), with h as a queue would, but on the calling goroutine and
// with the backing I/O done by pread, pwrite, fdatasync and fallocate on
// files (the device's Config.Files): Handle without waiting first, again
// as a worker would when that answers ErrWouldBlock, the described I/O,
// Finish, and the wait for a request the handler took. It returns the
// request's outcome. It exists to test handlers without a kernel.
func Run(h Handler, req *Request, files []int) error {
	if req.q != nil {
		return errors.New("ublk: Run needs a request of NewRequest")
	}
	results := make(chan error, 1)
	req.done = func(err error) { results <- err }
	fin, _ := h.(Finisher)
	req.noWait = true
	req.state.Store(reqBusy)
	err := h.Handle(req)
	for {
		switch {
		case errors.Is(err, ErrInProgress):
			err = <-results
			if !req.submitted {
				return err
			}
			req.submitted = false
		case isWouldBlock(err):
			if !req.noWait {
				return fmt.Errorf("ublk: handler would block in blocking mode: %w", syscall.EIO)
			}
			req.ClearIO()
			req.noWait = false
			req.state.Store(reqBusy)
			err = h.Handle(req)
			continue
		case err != nil || req.next >= len(req.ios):
			return err
		}
		// Do the described I/O, in order.
		err = nil
		for ; req.next < len(req.ios) && err == nil; req.next++ {
			err = runIO(req, &req.ios[req.next], files)
		}
		req.next = len(req.ios)
		if fin != nil {
			req.state.Store(reqBusy)
			err = fin.Finish(req, err)
		}
	}
}

// runIO does one IO of a request of NewRequest synchronously.
func runIO(req *Request, io *IO, files []int) error {
	fd := int(io.file.fd)
	if io.file.fixed {
		if fd >= len(files) {
			return syscall.EBADF
		}
		fd = files[fd]
	}
	switch io.kind {
	case ioRead, ioWrite:
		if io.at < 0 || int64(io.at)+io.n > int64(len(req.Buf)) {
			return fmt.Errorf("ublk: IO of %d bytes at %d of a %d-byte request: %w", io.n, io.at, len(req.Buf), syscall.EINVAL)
		}
		p := req.Buf[io.at : int64(io.at)+io.n]
		for len(p) > 0 {
			var n int
			var err error
			if io.kind == ioRead {
				n, err = unix.Pread(fd, p, io.off+(io.n-int64(len(p))))
			} else if io.dsync {
				n, err = unix.Pwritev2(fd, [][]byte{p}, io.off+(io.n-int64(len(p))), unix.RWF_DSYNC)
			} else {
				n, err = unix.Pwrite(fd, p, io.off+(io.n-int64(len(p))))
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if n == 0 {
				return syscall.EIO
			}
			p = p[n:]
		}
		return nil
	case ioSync:
		return unix.Fdatasync(fd)
	default:
		return unix.Fallocate(fd, io.mode, io.off, io.n)
	}
}
