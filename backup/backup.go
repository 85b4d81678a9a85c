package backup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/internal/atomicfile"
)

// pieceSize is how much is read, hashed and written at a time.
const pieceSize = 1 << 20

// Options describe a backup to write.
type Options struct {
	Dir        string       // the backup directory; created, must not hold a backup
	Device     string       // the device's name
	DeviceSize int64        // bytes
	BlockSize  int64        // change tracking block size
	Generation string       // change tracking point of the snapshot copied
	Changes    uint8        //
	Previous   *Manifest    // the backup this one is incremental to; nil: full
	Ranges     []cbt.Extent // what to copy, in order, on block boundaries
	Progress   func(int64)  // called with the bytes copied so far; may be nil
}

// Write copies opt.Ranges of src, the snapshot image, into a new backup
// and returns its manifest. Runs of zeros are not written (the data file
// is sparse). On failure, nothing of the backup is left.
func Write(ctx context.Context, src io.ReaderAt, opt Options) (m *Manifest, err error) {
	m = &Manifest{Version: manifestVersion, Device: opt.Device, DeviceSize: opt.DeviceSize, BlockSize: opt.BlockSize,
		Generation: opt.Generation, Changes: opt.Changes, Full: opt.Previous == nil, Created: time.Now().UTC(),
		Extents: []Extent{}, path: filepath.Join(opt.Dir, ManifestName)}
	if opt.Previous != nil {
		if m.Previous, err = filepath.Rel(opt.Dir, opt.Previous.path); err != nil {
			return nil, fmt.Errorf("backup: %w", err)
		}
		if m.PreviousSHA256, err = fileSHA256(opt.Previous.path); err != nil {
			return nil, fmt.Errorf("backup: previous manifest: %w", err)
		}
	}
	if err := os.MkdirAll(opt.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	if _, err := os.Stat(m.path); err == nil {
		return nil, fmt.Errorf("backup: %s already holds a backup (%w); choose a new directory", opt.Dir, os.ErrExist)
	}
	dataPath := filepath.Join(opt.Dir, DataName)
	data, err := os.OpenFile(dataPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	defer func() {
		data.Close()
		if err != nil {
			os.Remove(dataPath)
		}
	}()
	if err := data.Truncate(opt.DeviceSize); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	var done int64
	buf := make([]byte, pieceSize)
	for _, r := range splitRanges(opt.Ranges) {
		h := sha256.New()
		for off := r.Offset; off < r.Offset+r.Length; off += pieceSize {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("backup: %w", err)
			}
			p := buf[:min(pieceSize, r.Offset+r.Length-off)]
			if _, err := src.ReadAt(p, off); err != nil {
				return nil, fmt.Errorf("backup: read the image at %d: %w", off, err)
			}
			h.Write(p)
			if !allZero(p) {
				if _, err := data.WriteAt(p, off); err != nil {
					return nil, fmt.Errorf("backup: %w", err)
				}
			}
			done += int64(len(p))
			if opt.Progress != nil {
				opt.Progress(done)
			}
		}
		m.Extents = append(m.Extents, Extent{Extent: r, SHA256: hex.EncodeToString(h.Sum(nil))})
	}
	if err := m.check(); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	if err := data.Sync(); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(m.path, append(b, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	return m, nil
}

// splitRanges cuts ranges into pieces of at most maxExtent bytes.
func splitRanges(rs []cbt.Extent) []cbt.Extent {
	var out []cbt.Extent
	for _, r := range rs {
		for off := r.Offset; off < r.Offset+r.Length; off += maxExtent {
			out = append(out, cbt.Extent{Offset: off, Length: min(maxExtent, r.Offset+r.Length-off)})
		}
	}
	return out
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// Restore rebuilds at output, which must not exist, the image that the
// newest backup of chain (from Chain) copied, checking every checksum. It
// returns the bytes read. The output appears only once all of it is right.
func Restore(ctx context.Context, chain []*Manifest, output string, progress func(done, total int64)) (_ int64, err error) {
	m := chain[len(chain)-1]
	var total int64
	for _, l := range chain {
		if l.BlockSize != m.BlockSize {
			return 0, fmt.Errorf("%w: %s has blocks of %d bytes, %s of %d", ErrChain, l.path, l.BlockSize, m.path, m.BlockSize)
		}
		total += l.Bytes()
	}
	if _, err := os.Lstat(output); err == nil {
		return 0, fmt.Errorf("restore: %s exists (%w); remove it or choose another output", output, os.ErrExist)
	}
	tmp := output + ".partial"
	out, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	defer func() {
		out.Close()
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if err := out.Truncate(m.DeviceSize); err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	// Newest first: a block is written from the newest backup holding it;
	// older copies are read only to check their checksums.
	covered := make([]bool, (m.DeviceSize+m.BlockSize-1)/m.BlockSize)
	var done int64
	for i := len(chain) - 1; i >= 0; i-- {
		l := chain[i]
		n, err := restoreLink(ctx, l, out, covered, func(n int64) {
			if progress != nil {
				progress(done+n, total)
			}
		})
		done += n
		if err != nil {
			return done, err
		}
		for _, e := range l.Extents {
			for b := e.Offset / l.BlockSize; b*l.BlockSize < e.Offset+e.Length; b++ {
				covered[b] = true
			}
		}
	}
	if err := out.Sync(); err != nil {
		return done, fmt.Errorf("restore: %w", err)
	}
	if _, err := os.Lstat(output); err == nil {
		return done, fmt.Errorf("restore: %s appeared meanwhile (%w); left as it is", output, os.ErrExist)
	}
	if err := os.Rename(tmp, output); err != nil {
		return done, fmt.Errorf("restore: %w", err)
	}
	return done, atomicfile.SyncDir(filepath.Dir(output))
}

// restoreLink reads every extent of link l, checks it, and writes to out
// the blocks no newer link holds.
func restoreLink(ctx context.Context, l *Manifest, out *os.File, covered []bool, progress func(int64)) (int64, error) {
	data, err := os.Open(filepath.Join(l.dir(), DataName))
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrChain, err)
	}
	defer data.Close()
	st, err := data.Stat()
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrChain, err)
	}
	if st.Size() != l.DeviceSize {
		return 0, fmt.Errorf("%w: %s is not the data of %s (%d bytes, want %d)", ErrChain, data.Name(), l.path, st.Size(), l.DeviceSize)
	}
	buf := make([]byte, pieceSize)
	var done int64
	for _, e := range l.Extents {
		h := sha256.New()
		for off := e.Offset; off < e.Offset+e.Length; off += pieceSize {
			if err := ctx.Err(); err != nil {
				return done, fmt.Errorf("restore: %w", err)
			}
			p := buf[:min(pieceSize, e.Offset+e.Length-off)]
			if _, err := data.ReadAt(p, off); err != nil {
				return done, fmt.Errorf("%w: read %s at %d: %v", ErrChain, data.Name(), off, err)
			}
			h.Write(p)
			if err := writeUncovered(out, p, off, l.BlockSize, covered); err != nil {
				return done, fmt.Errorf("restore: %w", err)
			}
			done += int64(len(p))
			progress(done)
		}
		if sum := hex.EncodeToString(h.Sum(nil)); sum != e.SHA256 {
			return done, fmt.Errorf("%w: %s: the %d bytes at %d do not match their checksum", ErrChain, data.Name(), e.Length, e.Offset)
		}
	}
	return done, nil
}

// writeUncovered writes the blocks of p (at byte off of the device) that
// no newer backup holds, leaving zero blocks as holes.
func writeUncovered(out *os.File, p []byte, off, blockSize int64, covered []bool) error {
	for start := int64(0); start < int64(len(p)); {
		b := (off + start) / blockSize
		end := min(int64(len(p)), (b+1)*blockSize-off)
		if chunk := p[start:end]; !covered[b] && !allZero(chunk) {
			if _, err := out.WriteAt(chunk, off+start); err != nil {
				return err
			}
		}
		start = end
	}
	return nil
}
