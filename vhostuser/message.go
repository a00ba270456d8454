// Package vhostuser implements the back-end side of QEMU's vhost-user
// protocol (docs/interop/vhost-user.rst) for a virtio device: message
// framing with file descriptors, feature negotiation, the guest memory
// table, and vring set-up. It knows messages, memory and ring addresses, but
// nothing about blocks: the device behind it implements Device.
//
// A back-end serves one Device on one socket:
//
//	srv, err := vhostuser.Listen(vhostuser.ServerOptions{SocketPath: sock, Logger: log}, dev)
//	...
//	err = srv.Serve(ctx) // until ctx is done or srv.Close is called
//
// One front-end is served at a time, or two during a live migration on one
// host (only one of them runs rings); when one disconnects, its rings are
// stopped, its memory unmapped and the next front-end is accepted.
package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Request is a front-end to back-end message type.
type Request uint32

// Front-end requests (vhost-user.rst, "Front-end message types").
const (
	ReqNone                Request = 0
	ReqGetFeatures         Request = 1
	ReqSetFeatures         Request = 2
	ReqSetOwner            Request = 3
	ReqResetOwner          Request = 4
	ReqSetMemTable         Request = 5
	ReqSetLogBase          Request = 6
	ReqSetLogFd            Request = 7
	ReqSetVringNum         Request = 8
	ReqSetVringAddr        Request = 9
	ReqSetVringBase        Request = 10
	ReqGetVringBase        Request = 11
	ReqSetVringKick        Request = 12
	ReqSetVringCall        Request = 13
	ReqSetVringErr         Request = 14
	ReqGetProtocolFeatures Request = 15
	ReqSetProtocolFeatures Request = 16
	ReqGetQueueNum         Request = 17
	ReqSetVringEnable      Request = 18
	ReqSendRARP            Request = 19
	ReqNetSetMTU           Request = 20
	ReqSetBackendReqFd     Request = 21
	ReqIOTLBMsg            Request = 22
	ReqSetVringEndian      Request = 23
	ReqGetConfig           Request = 24
	ReqSetConfig           Request = 25
	ReqCreateCryptoSession Request = 26
	ReqCloseCryptoSession  Request = 27
	ReqPostcopyAdvise      Request = 28
	ReqPostcopyListen      Request = 29
	ReqPostcopyEnd         Request = 30
	ReqGetInflightFd       Request = 31
	ReqSetInflightFd       Request = 32
	ReqGPUSetSocket        Request = 33
	ReqResetDevice         Request = 34
	ReqVringKick           Request = 35
	ReqGetMaxMemSlots      Request = 36
	ReqAddMemReg           Request = 37
	ReqRemMemReg           Request = 38
	ReqSetStatus           Request = 39
	ReqGetStatus           Request = 40
)

var requestNames = map[Request]string{
	ReqGetFeatures: "GET_FEATURES", ReqSetFeatures: "SET_FEATURES",
	ReqSetOwner: "SET_OWNER", ReqResetOwner: "RESET_OWNER",
	ReqSetMemTable: "SET_MEM_TABLE", ReqSetLogBase: "SET_LOG_BASE",
	ReqSetLogFd: "SET_LOG_FD", ReqSetVringNum: "SET_VRING_NUM",
	ReqSetVringAddr: "SET_VRING_ADDR", ReqSetVringBase: "SET_VRING_BASE",
	ReqGetVringBase: "GET_VRING_BASE", ReqSetVringKick: "SET_VRING_KICK",
	ReqSetVringCall: "SET_VRING_CALL", ReqSetVringErr: "SET_VRING_ERR",
	ReqGetProtocolFeatures: "GET_PROTOCOL_FEATURES",
	ReqSetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	ReqGetQueueNum:         "GET_QUEUE_NUM", ReqSetVringEnable: "SET_VRING_ENABLE",
	ReqSendRARP: "SEND_RARP", ReqNetSetMTU: "NET_SET_MTU",
	ReqSetBackendReqFd: "SET_BACKEND_REQ_FD", ReqIOTLBMsg: "IOTLB_MSG",
	ReqSetVringEndian: "SET_VRING_ENDIAN", ReqGetConfig: "GET_CONFIG",
	ReqSetConfig: "SET_CONFIG", ReqCreateCryptoSession: "CREATE_CRYPTO_SESSION",
	ReqCloseCryptoSession: "CLOSE_CRYPTO_SESSION", ReqPostcopyAdvise: "POSTCOPY_ADVISE",
	ReqPostcopyListen: "POSTCOPY_LISTEN", ReqPostcopyEnd: "POSTCOPY_END",
	ReqGetInflightFd: "GET_INFLIGHT_FD", ReqSetInflightFd: "SET_INFLIGHT_FD",
	ReqGPUSetSocket: "GPU_SET_SOCKET", ReqResetDevice: "RESET_DEVICE",
	ReqVringKick: "VRING_KICK", ReqGetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	ReqAddMemReg: "ADD_MEM_REG", ReqRemMemReg: "REM_MEM_REG",
	ReqSetStatus: "SET_STATUS", ReqGetStatus: "GET_STATUS",
}

func (r Request) String() string {
	if s, ok := requestNames[r]; ok {
		return s
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// BackendRequest is a back-end to front-end message type, sent on the
// channel that SET_BACKEND_REQ_FD provides.
type BackendRequest uint32

const (
	BackendIOTLBMsg     BackendRequest = 1
	BackendConfigChange BackendRequest = 2
)

// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
const (
	ProtoMQ                 = 0
	ProtoLogShmfd           = 1
	ProtoRARP               = 2
	ProtoReplyAck           = 3
	ProtoNetMTU             = 4
	ProtoBackendReq         = 5
	ProtoCrossEndian        = 6
	ProtoCryptoSession      = 7
	ProtoPagefault          = 8
	ProtoConfig             = 9
	ProtoBackendSendFd      = 10
	ProtoHostNotifier       = 11
	ProtoInflightShmfd      = 12
	ProtoResetDevice        = 13
	ProtoInbandNotification = 14
	ProtoConfigureMemSlots  = 15
	ProtoStatus             = 16
)

// FeatureProtocolFeatures is the virtio feature bit (in GET/SET_FEATURES)
// that says the protocol-feature messages are understood.
const FeatureProtocolFeatures = 30

// Header flags.
const (
	FlagVersion     uint32 = 0x1 // the only protocol version
	FlagVersionMask uint32 = 0x3
	FlagReply       uint32 = 1 << 2
	FlagNeedReply   uint32 = 1 << 3
)

// Wire sizes and limits.
const (
	HeaderSize = 12
	// MaxPayload bounds a message body. The largest message QEMU sends is
	// SET_MEM_TABLE with 8 regions (8 + 8*32 bytes) or a config of 256
	// bytes; anything much larger is hostile.
	MaxPayload = 4096
	// MaxFds is the most file descriptors one message may carry.
	MaxFds = 8
	// MaxBaselineRegions is the region limit of SET_MEM_TABLE.
	MaxBaselineRegions = 8
	// MaxConfigSize is the largest virtio config space.
	MaxConfigSize = 256
	// VringFdMask selects the queue index in SET_VRING_KICK/CALL/ERR
	// payloads; VringNoFd says no descriptor is attached.
	VringIndexMask uint64 = 0xff
	VringNoFd      uint64 = 1 << 8
	// MaxRings is the most rings a vhost-user device can have: the
	// kick, call and err messages carry the ring index in 8 bits.
	MaxRings = int(VringIndexMask) + 1
)

// Header precedes every message.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32
}

func (h Header) NeedReply() bool { return h.Flags&FlagNeedReply != 0 }
func (h Header) IsReply() bool   { return h.Flags&FlagReply != 0 }

func (h Header) encode(b []byte) {
	binary.LittleEndian.PutUint32(b[0:], uint32(h.Request))
	binary.LittleEndian.PutUint32(b[4:], h.Flags)
	binary.LittleEndian.PutUint32(b[8:], h.Size)
}

// DecodeHeader parses a header and checks its version and size.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("short header: %d bytes", len(b))
	}
	h := Header{
		Request: Request(binary.LittleEndian.Uint32(b[0:])),
		Flags:   binary.LittleEndian.Uint32(b[4:]),
		Size:    binary.LittleEndian.Uint32(b[8:]),
	}
	if h.Flags&FlagVersionMask != FlagVersion {
		return h, fmt.Errorf("%v: unsupported protocol version %d", h.Request, h.Flags&FlagVersionMask)
	}
	if h.Size > MaxPayload {
		return h, fmt.Errorf("%v: payload of %d bytes exceeds %d", h.Request, h.Size, MaxPayload)
	}
	return h, nil
}

// ErrShortPayload is returned when a payload is smaller than its message
// type requires.
var ErrShortPayload = errors.New("payload too short")

// MemoryRegion describes one region of guest memory shared through an fd.
type MemoryRegion struct {
	GuestPhysAddr uint64
	Size          uint64
	UserAddr      uint64 // the front-end's virtual address of the region
	MmapOffset    uint64 // offset of the region in the fd
}

const memoryRegionSize = 32

// The fixed-size payloads (and the regions in memory tables) are plain
// little-endian structs: their Go types list the fields in wire order, a
// blank field where the wire has padding, so that one encoder and one
// decoder, on encoding/binary, serve them all. TestWireLayout holds each
// type to its layout in the specification.

// encodeFixed lays v out on the wire.
func encodeFixed(v any) []byte {
	b := make([]byte, binary.Size(v))
	putFixed(b, v)
	return b
}

// putFixed lays v out at the start of b, which has room for it.
func putFixed(b []byte, v any) {
	if _, err := binary.Encode(b, binary.LittleEndian, v); err != nil {
		// Only this file's fixed-size types come here: a bug, not input.
		panic(fmt.Sprintf("vhostuser: encode %T: %v", v, err))
	}
}

// decodeFixed reads a T from the start of b, refusing a b shorter than T
// on the wire.
func decodeFixed[T any](b []byte) (T, error) {
	var v T
	if len(b) < binary.Size(v) {
		return v, ErrShortPayload
	}
	if _, err := binary.Decode(b, binary.LittleEndian, &v); err != nil {
		return v, fmt.Errorf("decode %T: %w", v, err)
	}
	return v, nil
}

// EncodeMemTable builds a SET_MEM_TABLE payload.
func EncodeMemTable(regions []MemoryRegion) []byte {
	b := make([]byte, 8+memoryRegionSize*len(regions))
	binary.LittleEndian.PutUint32(b[0:], uint32(len(regions)))
	for i, r := range regions {
		putFixed(b[8+i*memoryRegionSize:], r)
	}
	return b
}

// DecodeMemTable parses a SET_MEM_TABLE payload.
func DecodeMemTable(b []byte) ([]MemoryRegion, error) {
	if len(b) < 8 {
		return nil, ErrShortPayload
	}
	n := binary.LittleEndian.Uint32(b[0:])
	if n == 0 || n > MaxBaselineRegions {
		return nil, fmt.Errorf("memory table with %d regions (1..%d allowed)", n, MaxBaselineRegions)
	}
	if uint64(len(b)) < 8+uint64(n)*memoryRegionSize {
		return nil, ErrShortPayload
	}
	regions := make([]MemoryRegion, n)
	for i := range regions {
		var err error
		if regions[i], err = decodeFixed[MemoryRegion](b[8+i*memoryRegionSize:]); err != nil {
			return nil, err
		}
	}
	return regions, nil
}

// EncodeSingleRegion builds an ADD_MEM_REG / REM_MEM_REG payload.
func EncodeSingleRegion(r MemoryRegion) []byte {
	b := make([]byte, 8+memoryRegionSize)
	putFixed(b[8:], r)
	return b
}

// DecodeSingleRegion parses an ADD_MEM_REG / REM_MEM_REG payload.
func DecodeSingleRegion(b []byte) (MemoryRegion, error) {
	if len(b) < 8 {
		return MemoryRegion{}, ErrShortPayload
	}
	return decodeFixed[MemoryRegion](b[8:])
}

// VringState is the payload of SET_VRING_NUM, SET_VRING_BASE,
// GET_VRING_BASE and SET_VRING_ENABLE.
type VringState struct {
	Index uint32
	Num   uint32
}

func (s VringState) Encode() []byte { return encodeFixed(s) }

func DecodeVringState(b []byte) (VringState, error) { return decodeFixed[VringState](b) }

// VringAddr is the payload of SET_VRING_ADDR. Addresses are the front-end's
// virtual addresses (user addresses), translated through the memory table.
type VringAddr struct {
	Index     uint32
	Flags     uint32 // bit 0: log writes to the used ring (not supported)
	DescUser  uint64
	UsedUser  uint64
	AvailUser uint64
	LogGuest  uint64
}

const vringAddrSize = 40

func (a VringAddr) Encode() []byte { return encodeFixed(a) }

func DecodeVringAddr(b []byte) (VringAddr, error) { return decodeFixed[VringAddr](b) }

// EncodeU64 and DecodeU64 handle the many messages whose payload is one
// 64-bit number (features, status, fd-carrying vring messages, acks).
func EncodeU64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}

func DecodeU64(b []byte) (uint64, error) {
	if len(b) < 8 {
		return 0, ErrShortPayload
	}
	return binary.LittleEndian.Uint64(b), nil
}

// ConfigSpace is the payload of GET_CONFIG, SET_CONFIG and the back-end's
// CONFIG_CHANGE_MSG.
type ConfigSpace struct {
	Offset uint32
	Flags  uint32 // SET_CONFIG: 0 writable fields, 1 during migration
	Data   []byte
}

func (c ConfigSpace) Encode() []byte {
	b := make([]byte, 12+len(c.Data))
	binary.LittleEndian.PutUint32(b[0:], c.Offset)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(c.Data)))
	binary.LittleEndian.PutUint32(b[8:], c.Flags)
	copy(b[12:], c.Data)
	return b
}

// DecodeConfigSpace parses a config payload; Data aliases b.
func DecodeConfigSpace(b []byte) (ConfigSpace, error) {
	if len(b) < 12 {
		return ConfigSpace{}, ErrShortPayload
	}
	off := binary.LittleEndian.Uint32(b[0:])
	size := binary.LittleEndian.Uint32(b[4:])
	if size > MaxConfigSize || uint64(off)+uint64(size) > MaxConfigSize {
		return ConfigSpace{}, fmt.Errorf("config access [%d,+%d) outside %d bytes", off, size, MaxConfigSize)
	}
	if uint64(len(b)) < 12+uint64(size) {
		return ConfigSpace{}, ErrShortPayload
	}
	return ConfigSpace{Offset: off, Flags: binary.LittleEndian.Uint32(b[8:]), Data: b[12 : 12+size]}, nil
}

// Inflight is the payload of GET_INFLIGHT_FD / SET_INFLIGHT_FD.
type Inflight struct {
	MmapSize   uint64
	MmapOffset uint64
	NumQueues  uint16
	QueueSize  uint16
	_          [4]byte // padding
}

// inflightSize is the size of QEMU's VhostUserInflight, with the 4 bytes
// of padding that align it to 8 (QEMU 7.2 sends 24 bytes).
const inflightSize = 24

func (f Inflight) Encode() []byte { return encodeFixed(f) }

func DecodeInflight(b []byte) (Inflight, error) { return decodeFixed[Inflight](b) }
