// Package backup writes full and incremental backups of a block device
// image and restores them.
//
// # Model
//
// A backup is a directory with two files: "data", a sparse file of the
// device's size that holds the backed-up bytes at their own offsets, and
// "manifest.json", which says which byte extents of "data" this backup
// holds, with a SHA-256 of each, and the change tracking point (package
// cbt) of the snapshot it copied. A full backup holds every extent of the
// device (runs of zeros stay holes); an incremental one holds the blocks
// changed since the point of its previous backup, which its manifest
// names by relative path and checksum. A chain is a full backup and the
// incrementals after it.
//
// Restore rebuilds the image of the newest manifest of a chain: every
// block comes from the newest backup that holds it, every extent of every
// link is checked against its checksum, and the output appears (by
// rename) only when all of that succeeded. A missing or altered link is an
// error that names it.
package backup

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/ublksnap/ublksnap/cbt"
)

// File names inside a backup directory.
const (
	ManifestName = "manifest.json"
	DataName     = "data"
)

// manifestVersion is the format of manifest.json.
const manifestVersion = 1

// maxExtent bounds the bytes covered by one checksum.
const maxExtent = 64 << 20

// ErrChain reports a chain of backups that cannot be restored: a missing,
// altered or foreign link.
var ErrChain = errors.New("broken backup chain")

// Extent is a byte range of the device held by a backup, with the SHA-256
// of its bytes: {"offset","length","sha256"} in the manifest.
type Extent struct {
	cbt.Extent
	SHA256 string `json:"sha256"`
}

// Manifest describes one backup.
type Manifest struct {
	Version    int       `json:"version"`
	Device     string    `json:"device"`      // the filtered device's name
	DeviceSize int64     `json:"device_size"` // bytes
	BlockSize  int64     `json:"block_size"`  // change tracking block size
	Generation string    `json:"generation"`  // change tracking generation of the snapshot
	Changes    uint8     `json:"changes"`     // its changes number
	Full       bool      `json:"full"`
	Created    time.Time `json:"created"`
	Extents    []Extent  `json:"extents"` // what this backup holds, in order
	// Previous is the manifest of the backup this one is incremental to,
	// relative to this backup's directory, and PreviousSHA256 the
	// checksum of that file.
	Previous       string `json:"previous,omitempty"`
	PreviousSHA256 string `json:"previous_sha256,omitempty"`

	path string // where it was loaded from or written to
}

// Path is the file the manifest was loaded from or written to.
func (m *Manifest) Path() string { return m.path }

// Bytes returns the bytes the backup holds.
func (m *Manifest) Bytes() int64 {
	var n int64
	for _, e := range m.Extents {
		n += e.Length
	}
	return n
}

// Load reads and checks a manifest.
func Load(p string) (*Manifest, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", p, err)
	}
	m.path = p
	if err := m.check(); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", p, err)
	}
	return &m, nil
}

// check validates what Restore relies on.
func (m *Manifest) check() error {
	if m.Version != manifestVersion {
		return fmt.Errorf("version %d, this ublksnap reads %d", m.Version, manifestVersion)
	}
	if m.DeviceSize <= 0 || m.BlockSize <= 0 || m.BlockSize&(m.BlockSize-1) != 0 {
		return fmt.Errorf("device size %d, block size %d: not a device", m.DeviceSize, m.BlockSize)
	}
	if m.Full == (m.Previous != "") {
		return errors.New("a full backup has no previous one, an incremental one has one")
	}
	end := int64(0)
	for _, e := range m.Extents {
		if e.Offset < end || e.Length <= 0 || e.Length > m.DeviceSize-e.Offset || e.Offset%m.BlockSize != 0 ||
			(e.Length%m.BlockSize != 0 && e.Offset+e.Length != m.DeviceSize) {
			return fmt.Errorf("extent of %d bytes at %d: out of order, outside the device or not on block boundaries", e.Length, e.Offset)
		}
		end = e.Offset + e.Length
	}
	return nil
}

// dir is the backup directory of the manifest.
func (m *Manifest) dir() string { return filepath.Dir(m.path) }

// fileSHA256 returns the hex SHA-256 of a file's bytes.
func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Chain returns the chain that ends with m, oldest (the full backup)
// first, checking each link's checksum and that all are of one device.
func Chain(m *Manifest) ([]*Manifest, error) {
	chain := []*Manifest{m}
	for cur := m; !cur.Full; {
		if len(chain) > 100000 {
			return nil, fmt.Errorf("%w: more than 100000 links from %s (a loop?)", ErrChain, m.path)
		}
		p := filepath.Join(cur.dir(), cur.Previous)
		sum, err := fileSHA256(p)
		if err != nil {
			return nil, fmt.Errorf("%w: %s names the previous backup %s: %v", ErrChain, cur.path, p, err)
		}
		if sum != cur.PreviousSHA256 {
			return nil, fmt.Errorf("%w: %s was changed after %s was made on it", ErrChain, p, cur.path)
		}
		prev, err := Load(p)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrChain, err)
		}
		if prev.Device != m.Device || prev.DeviceSize != m.DeviceSize {
			return nil, fmt.Errorf("%w: %s is of device %s (%d bytes), %s of %s (%d bytes)", ErrChain,
				prev.path, prev.Device, prev.DeviceSize, m.path, m.Device, m.DeviceSize)
		}
		chain = append(chain, prev)
		cur = prev
	}
	for i, j := 0, len(chain)-1; i < j; i, j = i+1, j-1 {
		chain[i], chain[j] = chain[j], chain[i]
	}
	return chain, nil
}
