// Package ublk is a pure-Go ublk server: it creates Linux ublk block devices
// (/dev/ublkbN) whose requests are served by a Handler in this process.
//
// # Model
//
// A Device ties together three kinds of kernel objects, as ublksrv does:
//
//	Ctrl    /dev/ublk-control, one 128-byte-SQE io_uring; ADD_DEV, SET_PARAMS,
//	        START_DEV, STOP_DEV, DEL_DEV and friends as URING_CMDs (ctrl.go)
//	queue   one per hardware queue: a goroutine locked to its OS thread for
//	        its whole life, owning a 64-byte-SQE io_uring, the read-only
//	        descriptor mmap of /dev/ublkcN, the backing files registered
//	        on that ring, and in copy mode Depth buffers of MaxIOSize bytes
//	        in anonymous memory (queue.go), in user copy a pool of them
//	        (bufpool.go)
//	Device  the lifecycle: validate, ADD_DEV, SET_PARAMS, open /dev/ublkcN,
//	        start the queues, START_DEV from another goroutine; Close runs
//	        STOP_DEV, lets the queues drain and unmap, closes the char device
//	        and deletes the device (device.go)
//
// Each queue first FETCHes every tag, then loops: wait in io_uring_enter,
// dispatch each request the kernel hands over to the Handler, put the
// backing I/O the handler described on the same ring (READ/WRITE, FSYNC,
// FALLOCATE; user_data bit 62 marks them, with tag and I/O index), resubmit
// short transfers for the rest, and queue a COMMIT_AND_FETCH (which
// completes the request and re-arms the tag) once its I/O is done, all in
// as few io_uring_enter calls as the ring allows. The common path never
// leaves the queue thread.
//
// # Data modes
//
// In copy mode (every kernel) the kernel copies write data into the tag's
// buffer before dispatch and read data out of it at commit, and the
// backing I/O reads or writes that buffer. In zero-copy mode (Linux 6.16+,
// SUPPORT_ZERO_COPY with AUTO_BUF_REG) the kernel registers the request's
// own pages at index tag of the ring's sparse buffer table before dispatch
// and unregisters them at commit: the backing I/O is READ_FIXED or
// WRITE_FIXED with that buffer index, the data never enters this process,
// and there are no tag buffers. Request.Buf is nil then, and a handler that
// must touch the bytes cannot be served in that mode. In user-copy mode
// (6.5+, USER_COPY) the queue copies a WRITE's data from /dev/ublkcN into
// a buffer of a bounded per-queue pool before the handler runs and a
// READ's data back before the commit: as many copies as copy mode, but
// buffers exist only while their request is in flight, so a queue's memory
// is Config.BufferMemory, not depth × MaxIOSize. Config.IOMode picks the
// mode; IOModeAuto takes zero copy where the kernel offers it, else user
// copy, else copy. A handler that needs a WRITE's data (Config.WriteData)
// gets it in zero copy too, copied in through USER_COPY, and fills READs
// with backing I/O and Request.CopyIn; Config.InlineMax gives small
// requests their data in a pool buffer in zero copy as well, for a
// handler that serves them with plain system calls.
//
// # Surviving the server
//
// A device created with Config.Recoverable (USER_RECOVERY with REISSUE)
// outlives the death of its serving process: the kernel keeps /dev/ublkbN,
// holds new requests, sends again those the dead server had taken, and
// waits. Recover (recovery.go) serves it from a new process: it waits for
// the quiesced state, sends START_USER_RECOVERY, opens /dev/ublkcN, starts
// the queues and sends END_USER_RECOVERY in place of START_DEV. Config.Owner
// is kept by the kernel (ublksrv_flags) and returned by Scan, so a process
// finds its own devices; Remove deletes one.
//
// # Handlers and threads
//
// Handler.Handle runs first on the queue thread with Request.NoWait true and
// must not block there. It describes the backing I/O (the common case),
// finishes the request at once (return nil or an error), takes it (return
// ErrInProgress and call Request.Complete or Request.Submit later from any
// goroutine: a gate that is paused, a chunk being copied), or answers
// ErrWouldBlock, after which the request is handed to one of a few blocking
// worker goroutines of that queue. Completions and submissions from other
// goroutines are queued and the queue thread is woken through an eventfd
// whose READ is always pending on the queue's ring: the kernel only accepts
// a commit from the thread that fetched the tag.
//
// # Kernel requirements
//
// Linux 6.0+ with CONFIG_BLK_DEV_UBLK (module ublk_drv) and io_uring
// enabled, and CAP_SYS_ADMIN. Opcodes are sent ioctl-encoded (6.4+) with a
// fallback to the legacy numbers; DEL_DEV_ASYNC (6.9+) is used when present.
// Zero copy needs UBLK_F_AUTO_BUF_REG (6.16+), user copy UBLK_F_USER_COPY
// (6.5+); older kernels run in copy mode.
//
// A process must not mount its own ublk device in its own mount namespace
// and then exit without unmounting: the kernel waits for the server that is
// exiting (the ublksrv "mount namespace caveat").
package ublk
