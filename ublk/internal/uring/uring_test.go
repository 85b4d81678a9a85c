package uring

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmapBuf returns n bytes of anonymous memory that never moves.
func mmapBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func newRing(t *testing.T, p Params) *Ring {
	t.Helper()
	r, err := New(p)
	if err != nil {
		t.Fatalf("New(%+v): %v", p, err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func tempFile(t *testing.T, size int64) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "f"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

// one submits the single prepared SQE, waits for its completion and returns it.
func one(t *testing.T, r *Ring) CQE {
	t.Helper()
	if _, err := r.SubmitAndWait(1); err != nil {
		t.Fatalf("SubmitAndWait: %v", err)
	}
	c, ok := r.PeekCQE()
	if !ok {
		t.Fatal("no CQE after SubmitAndWait(1)")
	}
	r.SeenCQE()
	return c
}

func sqe(t *testing.T, r *Ring) *SQE {
	t.Helper()
	s, err := r.GetSQE()
	if err != nil {
		t.Fatalf("GetSQE: %v", err)
	}
	return s
}

func TestSetupSizes(t *testing.T) {
	r := newRing(t, Params{Entries: 6, CQEntries: 64, Flags: SetupCQSize})
	if r.SQEntries() != 8 || r.CQEntries() != 64 || r.SQESize() != 64 {
		t.Fatalf("sq=%d cq=%d sqe=%d, want 8 64 64", r.SQEntries(), r.CQEntries(), r.SQESize())
	}
	r128 := newRing(t, Params{Entries: 4, Flags: SetupSQE128})
	if r128.SQESize() != 128 {
		t.Fatalf("SQE128 ring has %d-byte SQEs", r128.SQESize())
	}
	if _, err := New(Params{}); err == nil {
		t.Fatal("New with 0 entries succeeded")
	}
}

func TestNopAndRingFull(t *testing.T) {
	r := newRing(t, Params{Entries: 4})
	for i := 0; i < 4; i++ {
		PrepNop(sqe(t, r), uint64(100+i))
	}
	if _, err := r.GetSQE(); !errors.Is(err, ErrRingFull) {
		t.Fatalf("fifth GetSQE on a 4-entry ring: %v, want ErrRingFull", err)
	}
	if _, err := r.SubmitAndWait(4); err != nil {
		t.Fatal(err)
	}
	var got []uint64
	r.Reap(func(c CQE) {
		if c.Res != 0 {
			t.Errorf("NOP res %d", c.Res)
		}
		got = append(got, c.UserData)
	})
	if len(got) != 4 || got[0] != 100 || got[3] != 103 {
		t.Fatalf("user data %v", got)
	}
	// The ring wraps around many times.
	for i := 0; i < 1000; i++ {
		PrepNop(sqe(t, r), uint64(i))
		if c := one(t, r); c.UserData != uint64(i) {
			t.Fatalf("round %d: user data %d", i, c.UserData)
		}
	}
}

func TestReadWriteFsyncFallocate(t *testing.T) {
	for _, flags := range []uint32{0, SetupSingleIssuer | SetupDeferTaskrun | SetupCoopTaskrun} {
		t.Run("flags", func(t *testing.T) {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			r := newRing(t, Params{Entries: 8, Flags: flags})
			f := tempFile(t, 1<<20)
			fd := int(f.Fd())
			buf := mmapBuf(t, 64<<10)
			for i := range buf {
				buf[i] = byte(i * 7)
			}
			PrepWrite(sqe(t, r), fd, unsafe.Pointer(&buf[0]), 64<<10, 4096, unix.RWF_DSYNC, 1)
			if c := one(t, r); c.Res != 64<<10 || c.UserData != 1 {
				t.Fatalf("write: %+v", c)
			}
			want := bytes.Clone(buf)
			got := make([]byte, len(want))
			if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("file content after WRITE differs (err %v)", err)
			}

			clear(buf)
			PrepRead(sqe(t, r), fd, unsafe.Pointer(&buf[0]), 64<<10, 4096, 2)
			if c := one(t, r); c.Res != 64<<10 {
				t.Fatalf("read: %+v", c)
			}
			if !bytes.Equal(buf, want) {
				t.Fatal("READ returned other bytes than written")
			}

			PrepFsync(sqe(t, r), fd, FsyncDatasync, 3)
			if c := one(t, r); c.Res != 0 {
				t.Fatalf("fsync: %+v", c)
			}

			// Punch the first 8 KiB of the written range, then zero-range the next 8 KiB.
			PrepFallocate(sqe(t, r), fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 4096, 8192, 4)
			if c := one(t, r); c.Res != 0 {
				t.Fatalf("fallocate punch: %+v (%v)", c, syscall.Errno(-c.Res))
			}
			PrepFallocate(sqe(t, r), fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 12288, 8192, 5)
			if c := one(t, r); c.Res != 0 {
				t.Fatalf("fallocate zero range: %+v (%v)", c, syscall.Errno(-c.Res))
			}
			if _, err := f.ReadAt(got, 4096); err != nil {
				t.Fatal(err)
			}
			copy(want[:16384], make([]byte, 16384))
			if !bytes.Equal(got, want) {
				t.Fatal("file content after PUNCH_HOLE/ZERO_RANGE differs")
			}
			fi, _ := f.Stat()
			if fi.Size() != 1<<20 {
				t.Fatalf("KEEP_SIZE changed the size to %d", fi.Size())
			}

			// A read at a bad fd reports a negative errno, not a Go error.
			PrepRead(sqe(t, r), 1<<20, unsafe.Pointer(&buf[0]), 16, 0, 6)
			if c := one(t, r); c.Res != -int32(unix.EBADF) {
				t.Fatalf("read on a bad fd: res %d, want -EBADF", c.Res)
			}
		})
	}
}

// TestEventfdWakeup checks the mechanism the ublk queue loop uses to be
// woken from another goroutine: a READ (and a POLL_ADD) on an eventfd
// completes when the eventfd is written.
func TestEventfdWakeup(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r := newRing(t, Params{Entries: 8, Flags: SetupSingleIssuer | SetupDeferTaskrun | SetupCoopTaskrun})
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	buf := mmapBuf(t, 4096)
	PrepRead(sqe(t, r), efd, unsafe.Pointer(&buf[0]), 8, 0, 7)
	PrepPollAdd(sqe(t, r), efd, unix.POLLIN, 8)
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.PeekCQE(); ok {
		t.Fatal("completion before the eventfd was written")
	}
	if err := r.WaitTimeout(20 * time.Millisecond); err != nil && !errors.Is(err, ErrTimeout) {
		t.Fatalf("WaitTimeout: %v", err)
	}
	start := time.Now()
	go func() {
		time.Sleep(30 * time.Millisecond)
		var v [8]byte
		v[0] = 1
		unix.Write(efd, v[:])
	}()
	seen := map[uint64]int32{}
	for len(seen) < 2 {
		if _, err := r.SubmitAndWait(1); err != nil {
			t.Fatal(err)
		}
		r.Reap(func(c CQE) { seen[c.UserData] = c.Res })
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("wakeup took too long")
	}
	if seen[7] != 8 || seen[8]&int32(unix.POLLIN) == 0 {
		t.Fatalf("completions %v, want READ 8 bytes and POLLIN", seen)
	}
}

func TestWaitTimeout(t *testing.T) {
	r := newRing(t, Params{Entries: 2})
	start := time.Now()
	if err := r.WaitTimeout(50 * time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("WaitTimeout on an idle ring: %v, want ErrTimeout", err)
	}
	if el := time.Since(start); el < 40*time.Millisecond {
		t.Fatalf("WaitTimeout returned after %v", el)
	}
}

// TestURingCmdEncoding exercises URING_CMD on a socket (SOCKET_URING_OP_SIOCINQ,
// Linux 6.7+) with a 128-byte SQE ring: the opcode at @8 reaches the file.
func TestURingCmdEncoding(t *testing.T) {
	r := newRing(t, Params{Entries: 2, Flags: SetupSQE128})
	// UDP's proto ioctl answers SIOCINQ with the size of the next datagram.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Sendto(fd, []byte("hello"), 0, sa); err != nil {
		t.Fatal(err)
	}
	s := sqe(t, r)
	PrepURingCmd(s, fd, 0 /* SOCKET_URING_OP_SIOCINQ */, 9)
	s.Cmd80()[79] = 0 // the whole 80-byte area is addressable
	c := one(t, r)
	if c.Res == -int32(unix.EOPNOTSUPP) || c.Res == -int32(unix.EINVAL) {
		t.Fatalf("URING_CMD SIOCINQ unsupported on this kernel: %v", syscall.Errno(-c.Res))
	}
	if c.Res != 5 {
		t.Fatalf("URING_CMD SIOCINQ: res %d, want 5 (datagram size)", c.Res)
	}
}
