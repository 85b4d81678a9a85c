// Package storage holds the backing devices of ublksnap and the difference
// storage of a snapshot. It knows nothing of ublk or of chunks: it hands out
// regions of sectors and moves bytes.
//
// # Backing devices
//
// A Device is a regular file or a block device (File), or an in-memory
// stand-in (MemDevice). Every Device is an io.ReaderAt and io.WriterAt with a
// fixed Geometry; flush, discard, write-zeroes and growth are optional
// interfaces (Flusher, Discarder, ZeroWriter, Grower) probed once by type
// assertion through the helpers Flush, Discard and WriteZeroes. Block devices
// are opened with O_EXCL, regular files with an exclusive flock, so a second
// ublksnap cannot use the same backing store by mistake.
//
// # Difference storage
//
// A DiffStorage is created once per snapshot and shared by all its original
// devices. It owns a list of storage blocks: runs of sectors on backing
// devices that may hold chunk data. Space arrives in the two ways blksnap has
// had:
//
//   - ranges (blksnap v5): Append(path, ranges) adds sector ranges of a file or
//     block device, at any time, also while the snapshot is held;
//   - a growable file (blksnap v6/v7): NewFile takes a path or a directory (an
//     unnamed O_TMPFILE that disappears when the storage is closed) and grows
//     it with fallocate in steps of the minimum, up to a limit (a file already
//     larger is used as it is). A device that cannot grow (a block device, a
//     file opened with mmap, a Device without Grow) never grows: its first
//     min(capacity, limit) sectors are one range, and low_free_space asks
//     for more before they are used up.
//
// Ranges are checked without integer overflow and may not overlap each
// other or any range of the same device already in the storage: two chunks
// never share a region. The same device is the same Device value or, for a
// path given to Append, the same file (st_dev, st_ino) or block device
// (st_rdev) by whatever path: Append opens each file once, also when
// called for it concurrently.
//
// Both end up as storage blocks; a growable file is one block whose end moves
// as the file grows. Alloc carves chunk-sized regions first fit from the first
// empty block; a tail too small for the request is given up and its block
// moved to the filled list. A region is never freed before the storage is
// closed. The layout on a backing device is therefore:
//
//	| block 0: region | region | ... | unused tail | block 1: region | ...
//	  ^ Range.Start     ^ +count                      ^ next Range.Start
//
// A region holds the bytes of one chunk starting at its first sector; there
// is no header and no index on disk: the chunk map of package cow is the only
// index, and the difference storage is not meant to survive a crash.
//
// Accounting is in 512-byte sectors: capacity (space given), filled (space
// allocated or given up), requested (space asked for through low_free_space
// events, or the planned size of a growable file).
//
// # Events
//
// Each DiffStorage has one EventQueue. It posts low_free_space when the free
// remainder (capacity - filled) drops to half of the minimum and the storage
// cannot grow by itself (once per crossing, and once at creation when the
// storage has no space): storage made of ranges, or a growable file that has
// reached its limit, which also posts no_space the first time. A growable
// file below its limit grows silently. Package cow posts corrupted when a
// device's difference area fails. Events are consumed by exactly one waiter.
// Close closes the queue: waiters get ErrEventQueueClosed at once, and later
// posts are dropped. Append, AppendDevice and Alloc fail with ErrClosed
// after Close.
//
// # Overflow
//
// When no region can be had, the storage sets its overflow flag for good and
// Alloc fails with ErrNoSpace (which matches syscall.ENOSPC). The caller then
// marks its snapshot corrupted; the original device is never affected.
//
// # Concurrency
//
// DiffStorage and EventQueue are safe for concurrent use. Region I/O goes
// straight to the backing device without storage locks; a Device must allow
// concurrent ReadAt and WriteAt of disjoint ranges, as os.File does.
package storage
