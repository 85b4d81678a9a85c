package ublk

import "unsafe"

// This file mirrors include/uapi/linux/ublk_cmd.h. Field order, sizes and
// offsets are the kernel's; the size checks at the bottom fail to compile if
// any struct drifts.

// ioc builds an ioctl number like the kernel's _IOC(dir, 'u', nr, size).
func ioc(dir, nr, size uint32) uint32 {
	return dir<<30 | size<<16 | 'u'<<8 | nr
}

const (
	iocWrite = 1
	iocRead  = 2

	ctrlCmdSize = uint32(unsafe.Sizeof(ctrlCmd{}))
	ioCmdSize   = uint32(unsafe.Sizeof(ioCmd{}))
)

// Control command numbers (_IOC_NR); the legacy opcode is the bare number.
const (
	cmdGetQueueAff = 0x01
	cmdGetDevInfo  = 0x02
	cmdAddDev      = 0x04
	cmdDelDev      = 0x05
	cmdStartDev    = 0x06
	cmdStopDev     = 0x07
	cmdSetParams   = 0x08
	cmdGetParams   = 0x09
	cmdGetFeatures = 0x13
	cmdDelDevAsync = 0x14

	cmdStartUserRecovery = 0x10
	cmdEndUserRecovery   = 0x11
)

// ctrlOpcode returns the ioctl-encoded opcode of control command nr, or the
// legacy number when encoded is false.
func ctrlOpcode(nr uint32, encoded bool) uint32 {
	if !encoded {
		return nr
	}
	dir := uint32(iocRead | iocWrite)
	switch nr {
	case cmdGetQueueAff, cmdGetDevInfo, cmdGetParams, cmdGetFeatures, cmdDelDevAsync:
		dir = iocRead
	}
	return ioc(dir, nr, ctrlCmdSize)
}

// IO command numbers; always sent ioctl-encoded when the kernel has
// UBLK_F_CMD_IOCTL_ENCODE, else as legacy numbers.
const (
	ioFetchReq       = 0x20
	ioCommitAndFetch = 0x21
)

func ioOpcode(nr uint32, encoded bool) uint32 {
	if !encoded {
		return nr
	}
	return ioc(iocRead|iocWrite, nr, ioCmdSize)
}

// CQE results of FETCH/COMMIT_AND_FETCH.
const (
	ioResOK    = 0
	ioResAbort = -19 // -ENODEV: device stopping, do not re-issue
)

// Feature flags (ublksrv_ctrl_dev_info.flags, GET_FEATURES mask).
const (
	featSupportZeroCopy     = 1 << 0 // 6.15
	featURingCmdCompInTask  = 1 << 1
	featNeedGetData         = 1 << 2
	featUserRecovery        = 1 << 3
	featUserRecoveryReissue = 1 << 4
	featUnprivilegedDev     = 1 << 5
	featCmdIoctlEncode      = 1 << 6
	featUserCopy            = 1 << 7
	featAutoBufReg          = 1 << 11 // 6.16
	featNoAutoPartScan      = 1 << 18 // 7.0
)

// Device states (ublksrv_ctrl_dev_info.state).
const (
	devStateDead     = 0
	devStateLive     = 1
	devStateQuiesced = 2 // USER_RECOVERY: no server, requests held
	devStateFailIO   = 3 // USER_RECOVERY_FAIL_IO (6.13+): no server, requests fail
)

// Basic attributes (ublk_param_basic.attrs).
const (
	attrReadOnly      = 1 << 0
	attrRotational    = 1 << 1
	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

// Parameter types (ublk_params.types).
const (
	paramTypeBasic   = 1 << 0
	paramTypeDiscard = 1 << 1
	paramTypeDevt    = 1 << 2
)

// Request ops and flags in ublksrv_io_desc.op_flags.
const (
	descOpRead        = 0
	descOpWrite       = 1
	descOpFlush       = 2
	descOpDiscard     = 3
	descOpWriteSame   = 4
	descOpWriteZeroes = 5
	descFlagFUA       = 1 << 13
	descFlagNoUnmap   = 1 << 15
)

const (
	// descAreaStride is the distance between two queues' descriptor areas in
	// the /dev/ublkcN mmap space: round_up(UBLK_MAX_QUEUE_DEPTH * 24, PAGE_SIZE),
	// which is 98304 on 4 KiB pages (not a function of the real depth).
	maxQueueDepth = 4096
	sectorShift   = 9
)

// ctrlCmd is struct ublksrv_ctrl_cmd, the payload of a control URING_CMD at
// SQE offset 48.
type ctrlCmd struct {
	DevID      uint32 // 0xFFFFFFFF: any (ADD_DEV)
	QueueID    uint16 // 0xFFFF unless per-queue
	Len        uint16 // length of the buffer at Addr
	Addr       uint64 // user buffer (in or out)
	Data       uint64 // inline argument (pid for START_DEV)
	DevPathLen uint16
	Pad        uint16
	Reserved   uint32
}

// devInfo is struct ublksrv_ctrl_dev_info.
type devInfo struct {
	NrHwQueues    uint16
	QueueDepth    uint16
	State         uint16
	Pad0          uint16
	MaxIOBufBytes uint32
	DevID         uint32
	UblksrvPID    int32
	Pad1          uint32
	Flags         uint64
	UblksrvFlags  uint64
	OwnerUID      uint32
	OwnerGID      uint32
	Reserved1     uint64
	Reserved2     uint64
}

// ioDesc is struct ublksrv_io_desc, one per tag in the descriptor mmap.
type ioDesc struct {
	OpFlags     uint32
	NrSectors   uint32
	StartSector uint64
	Addr        uint64
}

// ioCmd is struct ublksrv_io_cmd, the payload of FETCH/COMMIT at SQE offset 48.
type ioCmd struct {
	QID    uint16
	Tag    uint16
	Result int32
	Addr   uint64
}

type paramBasic struct {
	Attrs            uint32
	LogicalBSShift   uint8
	PhysicalBSShift  uint8
	IOOptShift       uint8
	IOMinShift       uint8
	MaxSectors       uint32
	ChunkSectors     uint32
	DevSectors       uint64
	VirtBoundaryMask uint64
}

type paramDiscard struct {
	DiscardAlignment      uint32
	DiscardGranularity    uint32
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32
	MaxDiscardSegments    uint16
	Reserved0             uint16
}

type paramDevt struct {
	CharMajor, CharMinor, DiskMajor, DiskMinor uint32
}

type paramZoned struct {
	MaxOpenZones, MaxActiveZones, MaxZoneAppendSectors, Reserved uint32
	Reserved2, Reserved3                                         uint64
}

type paramDMAAlign struct {
	Alignment, Pad uint32
}

type paramSegment struct {
	SegBoundaryMask uint64
	MaxSegmentSize  uint32
	MaxSegments     uint16
	Pad             uint16
}

type paramIntegrity struct {
	Flags                uint32
	MaxIntegritySegments uint16
	IntervalExp          uint8
	MetadataSize         uint8
	PIOffset             uint8
	CsumType             uint8
	TagSize              uint8
	Pad                  [5]uint8
}

// params is struct ublk_params in its newest (152-byte) form; older kernels
// copy the prefix they know and clear type bits they do not.
type params struct {
	Len       uint32
	Types     uint32
	Basic     paramBasic
	Discard   paramDiscard
	Devt      paramDevt
	Zoned     paramZoned
	DMA       paramDMAAlign
	Seg       paramSegment
	Integrity paramIntegrity
}

// Compile-time ABI checks: each line fails to compile if a size is wrong.
var (
	_ [unsafe.Sizeof(ctrlCmd{}) - 32]byte
	_ [32 - unsafe.Sizeof(ctrlCmd{})]byte
	_ [unsafe.Sizeof(devInfo{}) - 64]byte
	_ [64 - unsafe.Sizeof(devInfo{})]byte
	_ [unsafe.Sizeof(ioDesc{}) - 24]byte
	_ [24 - unsafe.Sizeof(ioDesc{})]byte
	_ [unsafe.Sizeof(ioCmd{}) - 16]byte
	_ [16 - unsafe.Sizeof(ioCmd{})]byte
	_ [unsafe.Sizeof(params{}) - 152]byte
	_ [152 - unsafe.Sizeof(params{})]byte
	_ [unsafe.Offsetof(params{}.Zoned) - 80]byte
	_ [80 - unsafe.Offsetof(params{}.Zoned)]byte
)
