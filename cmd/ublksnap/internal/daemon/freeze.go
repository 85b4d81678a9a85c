package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Filesystem freeze ioctls, _IOWR('X', 119/120, int); x/sys has no names for them.
const (
	ioctlFIFREEZE = 0xc0045877
	ioctlFITHAW   = 0xc0045878
)

// mountTables lists the mount tables searched for a device's mounts, with
// the root to open their mount points under. The daemon runs in a private
// mount namespace, so the user's mounts are found in init's table and
// opened through init's root.
func mountTables() []struct{ table, root string } {
	return []struct{ table, root string }{
		{"/proc/1/mountinfo", "/proc/1/root"},
		{"/proc/self/mountinfo", ""},
	}
}

// mountPoints returns the mount points of the block device major:minor
// listed in a mountinfo table.
func mountPoints(r io.Reader, major, minor uint32) ([]string, error) {
	want := fmt.Sprintf("%d:%d", major, minor)
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		f := strings.Fields(sc.Text())
		if len(f) >= 5 && f[2] == want {
			out = append(out, unescapeMountinfo(f[4]))
		}
	}
	return out, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for space) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// frozenFS is a filesystem frozen with FIFREEZE, held open until thawed.
type frozenFS struct {
	path string
	dir  *os.File
}

// freezeDevice freezes every filesystem mounted from major:minor and returns
// them for thawAll. A device with no mounted filesystem yields none.
func freezeDevice(major, minor uint32) ([]frozenFS, error) {
	var frozen []frozenFS
	seen := map[string]bool{}
	for _, src := range mountTables() {
		f, err := os.Open(src.table)
		if err != nil {
			continue
		}
		mps, err := mountPoints(f, major, minor)
		f.Close()
		if err != nil {
			thawAll(frozen)
			return nil, fmt.Errorf("read %s: %w", src.table, err)
		}
		for _, mp := range mps {
			path := src.root + mp
			if seen[mp] {
				continue
			}
			dir, err := os.Open(path)
			if err != nil {
				thawAll(frozen)
				return nil, fmt.Errorf("freeze %s: %w", mp, err)
			}
			// A bind mount of an already frozen filesystem answers EBUSY.
			if err := unix.IoctlSetInt(int(dir.Fd()), ioctlFIFREEZE, 0); err != nil && !errors.Is(err, unix.EBUSY) {
				dir.Close()
				thawAll(frozen)
				return nil, fmt.Errorf("freeze %s: %w", mp, err)
			} else if err != nil {
				dir.Close()
				continue
			}
			seen[mp] = true
			frozen = append(frozen, frozenFS{path: mp, dir: dir})
		}
	}
	return frozen, nil
}

// thawAll thaws filesystems frozen by freezeDevice and returns the first error.
func thawAll(frozen []frozenFS) error {
	var first error
	for _, f := range frozen {
		if err := unix.IoctlSetInt(int(f.dir.Fd()), ioctlFITHAW, 0); err != nil && first == nil {
			first = fmt.Errorf("thaw %s: %w", f.path, err)
		}
		f.dir.Close()
	}
	return first
}
