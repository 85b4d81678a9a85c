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
//	        descriptor mmap of /dev/ublkcN and Depth buffers of MaxIOSize
//	        bytes in anonymous memory (queue.go)
//	Device  the lifecycle: validate, ADD_DEV, SET_PARAMS, open /dev/ublkcN,
//	        start the queues, START_DEV from another goroutine; Close runs
//	        STOP_DEV, lets the queues drain and unmap, closes the char device
//	        and deletes the device (device.go)
//
// Each queue first FETCHes every tag, then loops: wait in io_uring_enter,
// dispatch each request the kernel hands over to the Handler, and queue a
// COMMIT_AND_FETCH (which completes the request and re-arms the tag) for
// every finished request, all committed in one io_uring_enter.
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
// must not block there. It can finish the request at once (return nil or
// an error), take it (return ErrInProgress and call Request.Complete later
// from any goroutine), or answer ErrWouldBlock, after which the request is
// handed to one of a few blocking worker goroutines of that queue. Completions
// from other goroutines are queued and the queue thread is woken through an
// eventfd whose READ is always pending on the queue's ring: the kernel only
// accepts a commit from the thread that fetched the tag.
//
// # Kernel requirements
//
// Linux 6.0+ with CONFIG_BLK_DEV_UBLK (module ublk_drv) and io_uring
// enabled, and CAP_SYS_ADMIN. Opcodes are sent ioctl-encoded (6.4+) with a
// fallback to the legacy numbers; DEL_DEV_ASYNC (6.9+) is used when present.
// Data moves in copy mode: the kernel copies write data into the tag's
// buffer before dispatch and read data out of it at commit.
//
// A process must not mount its own ublk device in its own mount namespace
// and then exit without unmounting: the kernel waits for the server that is
// exiting (the ublksrv "mount namespace caveat").
package ublk
