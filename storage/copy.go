package storage

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrNoKernelCopy is returned by CopyRange when the kernel cannot copy
// between the two devices (not both regular files, files of different file
// systems, a file system without the copy); nothing was copied, and the
// caller copies through memory instead.
var ErrNoKernelCopy = errors.New("storage: no in-kernel copy between these devices")

// KernelCopyable reports whether dev can be a side of CopyRange: a regular
// file opened by this package, not mapped. Whether the kernel copies
// between two of them is known only when it is asked.
func KernelCopyable(dev Device) bool {
	f, ok := dev.(*File)
	return ok && !f.block && f.mapped == nil
}

// CopyRange copies n bytes at srcOff of src to dstOff of dst inside the
// kernel, with copy_file_range: the data never enters this process (and on
// a file system that shares extents, such as XFS or btrfs, nothing is
// copied at all). Both must be regular files opened by this package, not
// mapped. A source read with O_DIRECT is read past its page cache where
// the range is aligned for it, so the copy caches nothing of it; the
// destination is written through its page cache. The call blocks until
// the data is copied. It fails with ErrNoKernelCopy, having copied
// nothing, where the kernel has no such copy for the pair.
func CopyRange(dst Device, dstOff int64, src Device, srcOff, n int64) error {
	if !KernelCopyable(dst) || !KernelCopyable(src) {
		return ErrNoKernelCopy
	}
	d, s := dst.(*File), src.(*File)
	done := int64(0)
	for done < n {
		in, out := srcOff+done, dstOff+done
		sfd := s.fd
		if s.dfd >= 0 && (in|(n-done))&s.dioMask == 0 {
			sfd = s.dfd // aligned for O_DIRECT: nothing of it cached
		}
		c, err := unix.CopyFileRange(sfd, &in, d.fd, &out, int(n-done), 0)
		switch {
		case err == unix.EINTR:
			continue
		case done == 0 && (err == unix.EXDEV || err == unix.EOPNOTSUPP || err == unix.ENOSYS || err == unix.EINVAL):
			// EINVAL: a file system (or an O_DIRECT source) that takes
			// no copy of this kind; a bad range is the caller's bug
			// and fails again, with its own error, through memory.
			return ErrNoKernelCopy
		case err != nil:
			return fmt.Errorf("copy %s@%d+%d to %s@%d: %w", s.Name(), in, n-done, d.Name(), out, err)
		case c == 0 && done == 0:
			return ErrNoKernelCopy // as os.File.ReadFrom reads it: no copy here
		case c == 0:
			return fmt.Errorf("copy %s@%d+%d to %s@%d: end of file: %w", s.Name(), in, n-done, d.Name(), out, unix.EIO)
		}
		done += int64(c)
	}
	return nil
}

// CopyFrom fills the whole region with the region's length of src at
// srcOff, inside the kernel (see CopyRange).
func (r *DiffRegion) CopyFrom(src Device, srcOff int64) error {
	if err := CopyRange(r.Dev, r.Sector<<SectorShift, src, srcOff, r.Count<<SectorShift); err != nil {
		if errors.Is(err, ErrNoKernelCopy) {
			return err
		}
		return fmt.Errorf("fill diff region %s@%d: %w", r.Dev.Name(), r.Sector, err)
	}
	return nil
}
