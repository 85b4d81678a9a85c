// Package devconf reads and edits the declared devices of a host: the
// filtered devices the daemon attaches at every start, one per line of a
// text file (by default /etc/ublksnap/devices.conf):
//
//	# NAME   BACKING                                   [KEY=VALUE ...]
//	data     /dev/disk/by-id/nvme-SAMSUNG_123-part2    queues=2 depth=64
//	vmimage  /srv/images/vm.img                        io-mode=user-copy
//
// NAME names the device (letters, digits, '.', '_', '-'; it is also its
// udev link /dev/disk/by-ublksnap/NAME); BACKING is an absolute path,
// best a stable one (/dev/disk/by-id/..., /dev/disk/by-partuuid/..., or a
// file), because /dev/sdX may name another disk at the next boot. The
// keys are queues, depth and io-mode, as for `ublksnap attach`. A '#'
// starts a comment; blank lines are ignored.
//
// Parse keeps going past a bad line: each mistake is a *LineError naming
// the file and line, and the good lines are still returned, so one typo
// does not keep the other devices down. Add and Remove edit the file in
// place, keeping every other line (comments included) as it was, and
// replace it atomically under a lock on its directory.
package devconf

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/internal/atomicfile"
)

// DefaultPath is where the daemon and the CLI look by default.
const DefaultPath = "/etc/ublksnap/devices.conf"

// Device is one declared filtered device.
type Device struct {
	Name    string // the device's name
	Backing string // absolute path of its backing file or block device
	Queues  int    // 0: the daemon's default
	Depth   int    // 0: the daemon's default
	IOMode  string // "": the daemon's default
	Line    int    // where it is declared, from 1; 0 for one not read from a file
}

// LineError is a mistake on one line of a devices file.
type LineError struct {
	Path string // the file
	Line int    // from 1
	Err  error
}

func (e *LineError) Error() string { return fmt.Sprintf("%s:%d: %v", e.Path, e.Line, e.Err) }
func (e *LineError) Unwrap() error { return e.Err }

// Sentinels for what callers act on.
var (
	// ErrDeclared: Add of a name the file already declares.
	ErrDeclared = errors.New("devconf: name already declared")
	// ErrNotDeclared: Remove of a name the file does not declare.
	ErrNotDeclared = errors.New("devconf: name not declared")
)

// validName is what a device name may be: a path component that udev
// can use as a link name.
var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Parse reads a devices file (path names it in errors). It returns the
// devices of the good lines and a *LineError for each bad one: a name or
// backing missing or malformed, an unknown key, a bad value, a name
// declared twice (the first stays).
func Parse(r io.Reader, path string) ([]Device, []error) {
	var devs []Device
	var errs []error
	seen := map[string]int{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		fields := strings.Fields(content(sc.Text()))
		if len(fields) == 0 {
			continue
		}
		d, err := parseLine(fields)
		if err == nil {
			if first, ok := seen[d.Name]; ok {
				err = fmt.Errorf("name %q is already declared on line %d", d.Name, first)
			}
		}
		if err != nil {
			errs = append(errs, &LineError{Path: path, Line: n, Err: err})
			continue
		}
		d.Line = n
		seen[d.Name] = n
		devs = append(devs, d)
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("read %s: %w", path, err))
	}
	return devs, errs
}

// Load parses the file at path; a missing file declares nothing.
func Load(path string) ([]Device, []error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("devices file: %w", err)}
	}
	defer f.Close()
	return Parse(f, path)
}

// content is a line without its comment.
func content(line string) string {
	if i := strings.IndexByte(line, '#'); i >= 0 {
		return line[:i]
	}
	return line
}

// parseLine parses the fields of one declaration.
func parseLine(fields []string) (Device, error) {
	if len(fields) < 2 {
		return Device{}, fmt.Errorf("want NAME BACKING [KEY=VALUE ...], got %q", strings.Join(fields, " "))
	}
	d := Device{Name: fields[0], Backing: fields[1]}
	if err := d.Check(); err != nil {
		return Device{}, err
	}
	for _, kv := range fields[2:] {
		key, value, ok := strings.Cut(kv, "=")
		if !ok || value == "" {
			return Device{}, fmt.Errorf("%q: want KEY=VALUE", kv)
		}
		switch key {
		case "queues", "depth":
			n, err := strconv.Atoi(value)
			if err != nil || n <= 0 {
				return Device{}, fmt.Errorf("%s=%s: want a positive number", key, value)
			}
			if key == "queues" {
				d.Queues = n
			} else {
				d.Depth = n
			}
		case "io-mode":
			d.IOMode = value
		default:
			return Device{}, fmt.Errorf("unknown key %q (want queues, depth or io-mode)", key)
		}
	}
	return d, nil
}

// Check reports what is wrong with d's name or backing, if anything.
func (d Device) Check() error {
	if !validName.MatchString(d.Name) {
		return fmt.Errorf("name %q: want letters, digits, '.', '_' or '-', at most 64", d.Name)
	}
	if !filepath.IsAbs(d.Backing) || strings.ContainsAny(d.Backing, "# \t") {
		return fmt.Errorf("backing %q: want an absolute path without blanks or '#'", d.Backing)
	}
	return nil
}

// String is d as a line of the file.
func (d Device) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", d.Name, d.Backing)
	if d.Queues > 0 {
		fmt.Fprintf(&b, " queues=%d", d.Queues)
	}
	if d.Depth > 0 {
		fmt.Fprintf(&b, " depth=%d", d.Depth)
	}
	if d.IOMode != "" {
		fmt.Fprintf(&b, " io-mode=%s", d.IOMode)
	}
	return b.String()
}

// Add declares d at the end of the file at path, creating the file (and
// its directory) if needed. A name the file declares already is
// ErrDeclared; the file is then unchanged.
func Add(path string, d Device) error {
	if err := d.Check(); err != nil {
		return err
	}
	return edit(path, func(lines [][]byte) ([][]byte, error) {
		if declaring(lines, d.Name) >= 0 {
			return nil, fmt.Errorf("%s in %s: %w", d.Name, path, ErrDeclared)
		}
		return append(lines, []byte(d.String())), nil
	})
}

// Remove takes the declaration of name out of the file at path. A name
// the file does not declare is ErrNotDeclared.
func Remove(path, name string) error {
	return edit(path, func(lines [][]byte) ([][]byte, error) {
		i := declaring(lines, name)
		if i < 0 {
			return nil, fmt.Errorf("%s in %s: %w", name, path, ErrNotDeclared)
		}
		return append(lines[:i], lines[i+1:]...), nil
	})
}

// declaring returns the index of the line whose first field is name, or -1.
func declaring(lines [][]byte, name string) int {
	for i, l := range lines {
		if f := strings.Fields(content(string(l))); len(f) > 0 && f[0] == name {
			return i
		}
	}
	return -1
}

// edit applies change to the lines of the file at path and replaces the
// file atomically, holding a lock on its directory so that two edits do
// not lose one another.
func edit(path string, change func([][]byte) ([][]byte, error)) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("devices file directory: %w", err)
	}
	lock, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("devices file directory: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", dir, err)
	}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("devices file: %w", err)
	}
	var lines [][]byte
	if len(data) > 0 {
		lines = bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n"))
	}
	lines, err = change(lines)
	if err != nil {
		return err
	}
	out := bytes.Join(lines, []byte("\n"))
	if len(out) > 0 {
		out = append(out, '\n')
	}
	perm := os.FileMode(0o644)
	if fi, err := os.Stat(path); err == nil {
		perm = fi.Mode().Perm()
	}
	if err := atomicfile.WriteFile(path, out, perm); err != nil {
		return fmt.Errorf("devices file: %w", err)
	}
	return nil
}
