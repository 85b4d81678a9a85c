package ublk

import (
	"testing"
	"unsafe"
)

func TestUAPISizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"ublksrv_ctrl_cmd", unsafe.Sizeof(ctrlCmd{}), 32},
		{"ublksrv_ctrl_dev_info", unsafe.Sizeof(devInfo{}), 64},
		{"ublksrv_io_desc", unsafe.Sizeof(ioDesc{}), 24},
		{"ublksrv_io_cmd", unsafe.Sizeof(ioCmd{}), 16},
		{"ublk_params", unsafe.Sizeof(params{}), 152},
		{"ublk_param_basic", unsafe.Sizeof(paramBasic{}), 32},
		{"ublk_param_discard", unsafe.Sizeof(paramDiscard{}), 20},
		{"ublk_params.discard offset", unsafe.Offsetof(params{}.Discard), 40},
		{"ublk_params.devt offset", unsafe.Offsetof(params{}.Devt), 60},
		{"ublk_params.zoned offset", unsafe.Offsetof(params{}.Zoned), 80},
		{"ublk_params.dma offset", unsafe.Offsetof(params{}.DMA), 112},
		{"ublk_params.seg offset", unsafe.Offsetof(params{}.Seg), 120},
		{"ublk_params.integrity offset", unsafe.Offsetof(params{}.Integrity), 136},
		{"dev_info.flags offset", unsafe.Offsetof(devInfo{}.Flags), 24},
		{"basic.dev_sectors offset", unsafe.Offsetof(paramBasic{}.DevSectors), 16},
	} {
		if c.got != c.want {
			t.Errorf("%s is %d, kernel expects %d", c.name, c.got, c.want)
		}
	}
}

// TestOpcodes compares the derived ioctl numbers with the values gcc computes
// from the kernel header.
func TestOpcodes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint32
	}{
		{"GET_DEV_INFO", ctrlOpcode(cmdGetDevInfo, true), 0x80207502},
		{"ADD_DEV", ctrlOpcode(cmdAddDev, true), 0xc0207504},
		{"DEL_DEV", ctrlOpcode(cmdDelDev, true), 0xc0207505},
		{"START_DEV", ctrlOpcode(cmdStartDev, true), 0xc0207506},
		{"STOP_DEV", ctrlOpcode(cmdStopDev, true), 0xc0207507},
		{"SET_PARAMS", ctrlOpcode(cmdSetParams, true), 0xc0207508},
		{"GET_PARAMS", ctrlOpcode(cmdGetParams, true), 0x80207509},
		{"GET_FEATURES", ctrlOpcode(cmdGetFeatures, true), 0x80207513},
		{"DEL_DEV_ASYNC", ctrlOpcode(cmdDelDevAsync, true), 0x80207514},
		{"ADD_DEV legacy", ctrlOpcode(cmdAddDev, false), 0x04},
		{"FETCH_REQ", ioOpcode(ioFetchReq, true), 0xc0107520},
		{"COMMIT_AND_FETCH_REQ", ioOpcode(ioCommitAndFetch, true), 0xc0107521},
		{"FETCH_REQ legacy", ioOpcode(ioFetchReq, false), 0x20},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}
