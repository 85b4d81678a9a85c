// Package nbd is a read-only NBD server (the protocol of
// NetworkBlockDevice/nbd doc/proto.md) for backup clients: qemu-img,
// nbdcopy, nbdinfo, libnbd scripts.
//
// # Model
//
// A Server serves Exports, each a named, sized io.ReaderAt with optional
// metadata contexts (BLOCK_STATUS): the server knows nothing of what it
// exports. Every connection runs on its own goroutines: one reads the
// handshake and then the requests, a few workers serve them, and replies
// are written whole under the connection's write lock, so that a slow
// client slows only itself. Bytes held by requests in flight, over all
// connections, are bounded by Server.MaxBuffered; a client that does not
// read its replies within Server.WriteTimeout is dropped, which frees them.
//
// The handshake is fixed newstyle only, without TLS (STARTTLS is refused
// as unsupported; a TLS layer would wrap the connection where serveConn
// takes it). Options: EXPORT_NAME, ABORT, LIST, INFO, GO,
// STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT; any other gets
// ERR_UNSUP. Commands: READ, FLUSH (nothing to flush), DISC and
// BLOCK_STATUS; WRITE, TRIM and WRITE_ZEROES get EPERM. A malformed
// message (bad magic, a length past the limits, a truncated message) ends
// its connection with an error logged, never the server.
package nbd

// Handshake magics and flags.
const (
	magicNBD      = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply = 0x3e889045565a9

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option reply types.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4

	repErrUnsup   = 1<<31 + 1
	repErrPolicy  = 1<<31 + 2
	repErrInvalid = 1<<31 + 3
	repErrUnknown = 1<<31 + 6
	repErrTooBig  = 1<<31 + 9
)

// Information types of INFO and GO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tfHasFlags     = 1 << 0
	tfReadOnly     = 1 << 1
	tfSendFlush    = 1 << 2
	tfCanMultiConn = 1 << 8
)

// Requests and replies.
const (
	magicRequest    = 0x25609513
	magicSimple     = 0x67446698
	magicStructured = 0x668e33ef

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4

	replyFlagDone = 1 << 0

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkBlockStatus = 5
	chunkError       = 1<<15 + 1
)

// Errors sent to clients (NBD's own numbers, which are Linux's).
const (
	errPerm     = 1
	errIO       = 5
	errInvalid  = 22
	errNotSup   = 95
	errShutdown = 108
)

// Limits.
const (
	maxOptionLength = 64 << 10            // an option's data; more ends the connection
	maxStringLength = 4096                // names and queries (proto.md)
	maxPayload      = 1 << maxBufferShift // largest READ (32 MiB); also the bound on a WRITE we discard
	minBlock        = 512
	preferredBlock  = 4096
	maxExtents      = 1 << 20 // per BLOCK_STATUS chunk
)
