// Package api is the protocol between the ublksnap daemon and its CLI:
// HTTP with JSON bodies on a unix socket (default DefaultSocket), so that
// `curl --unix-socket /run/ublksnap/ublksnap.sock http://ublksnap/v1/status`
// works too.
//
// Endpoints (all bodies JSON; errors are an Error with a 4xx/5xx status):
//
//	GET    /v1/status                       Status
//	POST   /v1/devices                      AttachRequest → Device
//	DELETE /v1/devices?device=DEV&force=BOOL  detach (force: even while open or mounted)
//	GET    /v1/snapshots                    []string (snapshot UUIDs)
//	POST   /v1/snapshots                    CreateSnapshotRequest → Snapshot
//	GET    /v1/snapshots/{id}               Snapshot
//	DELETE /v1/snapshots/{id}?force=BOOL    destroy
//	POST   /v1/snapshots/{id}/devices       AddDeviceRequest → Snapshot
//	POST   /v1/snapshots/{id}/storage       AppendStorageRequest → Snapshot
//	POST   /v1/snapshots/{id}/take          → Snapshot
//	GET    /v1/snapshots/{id}/event?timeout_ms=N   Event (Code "timeout" if none came)
//	GET    /v1/snapshot-info?device=DEV     SnapshotInfo
//	POST   /v1/shutdown?force=BOOL          stop for good: every device and image is
//	                                        deleted (refused while one is open or mounted, unless force)
//
// Sizes are bytes and sector counts are 512-byte units, as named. A run of
// sectors is a storage.Range ({"start","count"}) and a run of bytes a
// cbt.Extent ({"offset","length"}): the wire uses the engine's own types.
package api

import (
	"time"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/storage"
)

// DefaultSocket is where the daemon listens unless told otherwise
// (--socket or the UBLKSNAP_SOCKET environment variable).
const DefaultSocket = "/run/ublksnap/ublksnap.sock"

// SocketEnv names the environment variable that overrides DefaultSocket.
const SocketEnv = "UBLKSNAP_SOCKET"

// AttachRequest asks the daemon to present a backing file or block device
// as a filtered ublk device.
type AttachRequest struct {
	Backing string `json:"backing"`
	Name    string `json:"name,omitempty"`
	Queues  int    `json:"queues,omitempty"`
	Depth   int    `json:"depth,omitempty"`
	IOMode  string `json:"io_mode,omitempty"` // "auto", "zero-copy", "user-copy" or "copy"; "": the daemon's default
}

// Device is a filtered original device.
type Device struct {
	Name     string `json:"name"`
	Path     string `json:"path"`    // /dev/ublkbN
	Backing  string `json:"backing"` // the file or block device behind it
	Size     uint64 `json:"size"`    // bytes
	Snapshot string `json:"snapshot,omitempty"`
	IOMode   string `json:"io_mode"`   // how its data moves: "copy", "user-copy" or "zero-copy"
	DirectIO bool   `json:"direct_io"` // the backing is read and written with O_DIRECT
}

// CreateSnapshotRequest creates a snapshot with its difference storage.
// Storage is a file (grown up to Limit), a directory (an unnamed temporary
// file in it) or a block device.
type CreateSnapshotRequest struct {
	Devices []string `json:"devices,omitempty"`
	Storage string   `json:"storage"`
	Limit   uint64   `json:"limit"` // bytes
	// Force allows an existing, non-empty regular file that ublksnap did
	// not create to be used (and overwritten) as the storage.
	Force bool `json:"force,omitempty"`
}

// AddDeviceRequest adds a filtered device to a snapshot not yet taken.
type AddDeviceRequest struct {
	Device string `json:"device"`
}

// AppendStorageRequest adds sector ranges of a file or block device to a
// snapshot's difference storage; no ranges means the whole of it. The
// daemon refuses a negative start or count.
type AppendStorageRequest struct {
	Path   string          `json:"path"`
	Ranges []storage.Range `json:"ranges,omitempty"`
}

// Snapshot states.
const (
	StateCreated   = "created"   // devices and storage may still be added
	StateTaken     = "taken"     // images are served
	StateCorrupted = "corrupted" // at least one member's diff area failed
)

// Snapshot describes one snapshot.
type Snapshot struct {
	ID      string           `json:"id"`
	State   string           `json:"state"`
	Devices []SnapshotMember `json:"devices"`
	Storage StorageInfo      `json:"storage"`
}

// SnapshotMember is one original device of a snapshot and its image.
type SnapshotMember struct {
	Device       string `json:"device"`                  // the filtered device's path
	Image        string `json:"image,omitempty"`         // the image's path once taken
	ImageIOMode  string `json:"image_io_mode,omitempty"` // how the image's data moves: "copy", "user-copy" or "zero-copy"
	ChunkSize    uint64 `json:"chunk_size,omitempty"`
	ChunksCopied uint64 `json:"chunks_copied"`
	// ChunksCopiedInKernel counts the copied chunks saved by an in-kernel
	// copy (copy_file_range), never in the daemon's memory.
	ChunksCopiedInKernel uint64 `json:"chunks_copied_in_kernel"`
	// ChunksInMemory counts the copied chunks held in the daemon's memory
	// and not yet in the difference storage (whose used bytes do not
	// count them yet).
	ChunksInMemory uint64 `json:"chunks_in_memory"`
	ErrorCode      int    `json:"error_code"` // negative errno once corrupted, else 0
}

// StorageInfo is a difference storage's accounting, in bytes.
type StorageInfo struct {
	Capacity uint64 `json:"capacity"`
	Used     uint64 `json:"used"`
	Limit    uint64 `json:"limit"`
}

// SnapshotInfo answers "which snapshot holds this device, and how is it".
type SnapshotInfo struct {
	Device    string `json:"device"`
	Snapshot  string `json:"snapshot,omitempty"`
	State     string `json:"state"`
	Image     string `json:"image,omitempty"`
	ErrorCode int    `json:"error_code"`
}

// Event codes.
const (
	EventTimeout      = "timeout"
	EventLowFreeSpace = "low_free_space"
	EventNoSpace      = "no_space"
	EventCorrupted    = "corrupted"
)

// Event is one snapshot event, or Code EventTimeout when none came in time.
type Event struct {
	Code             string    `json:"code"`
	Time             time.Time `json:"time,omitzero"`
	RequestedSectors uint64    `json:"requested_sectors,omitempty"` // low_free_space
	Device           string    `json:"device,omitempty"`            // corrupted
	Errno            int       `json:"errno,omitempty"`             // corrupted
	Error            string    `json:"error,omitempty"`             // corrupted: strerror
}

// Status is the daemon's whole state for `ublksnap status`.
type Status struct {
	Version   string     `json:"version"`
	Devices   []Device   `json:"devices"`
	Snapshots []Snapshot `json:"snapshots"`
	// Unrecovered lists the devices of an earlier daemon that this one
	// could not serve again.
	Unrecovered []Unrecovered `json:"unrecovered,omitempty"`
	// Declared lists the devices of the daemon's devices file and what
	// became of each at its start.
	Declared []Declared `json:"declared,omitempty"`
}

// Declared is a device of the devices file (see internal/devconf).
type Declared struct {
	Source  string `json:"source"` // FILE:LINE
	Name    string `json:"name,omitempty"`
	Backing string `json:"backing,omitempty"`
	Device  string `json:"device,omitempty"` // the filtered device serving it
	Error   string `json:"error,omitempty"`  // why none does
}

// Unrecovered is a device of an earlier daemon that was not served again.
type Unrecovered struct {
	Device  string `json:"device"` // /dev/ublkbN it was
	Name    string `json:"name"`
	Backing string `json:"backing"`
	Error   string `json:"error"`
}

// Error codes carried in Error.Code.
const (
	CodeBadRequest = "bad_request" // the request cannot be done as given
	CodeNotFound   = "not_found"   // unknown device or snapshot
	CodeConflict   = "conflict"    // state forbids it: already taken, member elsewhere, busy
	CodeForbidden  = "forbidden"   // no permission (EPERM, EACCES, EROFS)
	CodeNoSpace    = "no_space"    // out of space (ENOSPC)
	CodeLost       = "lost"        // the snapshot died with an earlier daemon (ENOTRECOVERABLE)
	CodeInternal   = "internal"
)

// Error is the body of every failed request.
type Error struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
	// Errno is the system error behind the failure (ENOENT, EBUSY, ...),
	// when there is one.
	Errno int `json:"errno,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// CBTInfo describes the change tracking map of a filtered device.
type CBTInfo struct {
	Device     string `json:"device"`
	BlockSize  int64  `json:"block_size"`  // bytes per tracking block
	BlockCount int64  `json:"block_count"` // blocks; the last may be partial
	Capacity   int64  `json:"capacity"`    // device size in bytes
	Generation string `json:"generation"`  // UUID; a new one means the history is lost
	Changes    uint8  `json:"changes"`     // the number of the last take
}

// CBTMap is the read map of a filtered device: one byte per block, the
// number of the interval in which the block last changed.
type CBTMap struct {
	CBTInfo
	Map []byte `json:"map"`
}

// MarkDirtyRequest marks byte ranges of a device changed, in this backup
// and the next.
type MarkDirtyRequest struct {
	Device string       `json:"device"`
	Ranges []cbt.Extent `json:"ranges"`
}

// ExportRequest asks for an NBD export of the images of a taken snapshot
// (all of them, or the image of Device), on Listen: unix:PATH or
// tcp:HOST:PORT.
type ExportRequest struct {
	Snapshot    string `json:"snapshot"`
	Device      string `json:"device,omitempty"`
	Listen      string `json:"listen"`
	Name        string `json:"name,omitempty"`         // export name of the one image; default: the device's name
	AllowRemote bool   `json:"allow_remote,omitempty"` // a TCP address that is not loopback
}

// Export is a running NBD export.
type Export struct {
	Listen   string         `json:"listen"`
	Address  string         `json:"address"` // where clients connect
	Snapshot string         `json:"snapshot"`
	Exports  []ExportMember `json:"exports"`
}

// ExportMember is one export name of an Export.
type ExportMember struct {
	Name   string `json:"name"`
	Device string `json:"device"`
	Size   uint64 `json:"size"`
	// Bitmap is the dirty bitmap context of the changes since the
	// device's previous take, if there was one.
	Bitmap string `json:"bitmap,omitempty"`
}
