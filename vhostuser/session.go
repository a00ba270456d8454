package vhostuser

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/thinblk/thinblk/internal/eventfd"
	"github.com/thinblk/thinblk/virtio"
)

// OfferedProtocolFeatures are the protocol features this back-end offers.
const OfferedProtocolFeatures uint64 = 1<<ProtoMQ | 1<<ProtoReplyAck | 1<<ProtoConfig |
	1<<ProtoBackendReq | 1<<ProtoConfigureMemSlots | 1<<ProtoResetDevice | 1<<ProtoStatus |
	1<<ProtoLogShmfd | 1<<ProtoInflightShmfd

// messageWriter is where replies go (a *Conn; a recorder in fuzz tests).
type messageWriter interface {
	Write(h Header, payload []byte, files ...*os.File) error
}

// vring is everything the session knows about one ring, kept apart from
// the device's queue so that a ring can be stopped and restarted (memory
// table change, reconnection, a new back-end process) from it alone: what
// the front-end set (size, base, addresses, eventfds), where the ring areas
// are while it runs, its part of the in-flight region and, for live
// migration, its dirty log.
type vring struct {
	num     uint16 // ring size; 0 until SET_VRING_NUM
	addr    VringAddr
	addrSet bool
	base    uint16 // available index to resume from

	// While running: the ring areas in guest-physical address space (what
	// a dirty log records) and in host memory (what the device uses).
	descGPA, availGPA, usedGPA uint64
	desc, avail, used          []byte

	// kick and call are held outside Go's poller (package eventfd).
	kick    *eventfd.FD
	kickSet bool // SET_VRING_KICK received (kick may be nil: polled ring)
	call    *eventfd.FD
	errFd   *os.File

	// inflight is this ring's queue region of the in-flight area
	// (INFLIGHT_SHMFD); nil without one.
	inflight *inflightRing
	// dirty is where the ring's writes to guest memory are logged during
	// live migration (LOG_SHMFD); the device gets it at start, and it
	// follows LOG_ALL and SET_VRING_ADDR's log flag while the ring runs.
	dirty *ringDirtyLog

	enabled bool
	running bool // the device is serving this ring
	// stuck: the device failed to stop the ring, so it may still touch
	// guest memory; the connection is closed and the memory left mapped.
	stuck bool
}

func (r *vring) closeFiles() {
	r.kick.Close()
	r.call.Close()
	r.kick, r.call = nil, nil
	if r.errFd != nil {
		r.errFd.Close()
		r.errFd = nil
	}
	r.kickSet = false
}

// session is the protocol state of one front-end connection. Only the
// connection's goroutine touches it, so the Device is never called
// concurrently by the server.
type session struct {
	log *slog.Logger
	dev Device
	out messageWriter

	offered      uint64 // virtio features offered (with PROTOCOL_FEATURES)
	features     uint64 // acknowledged by SET_FEATURES
	offeredProto uint64 // protocol features offered
	protocol     uint64 // acknowledged by SET_PROTOCOL_FEATURES
	status       uint8
	mem          *guestMemory
	rings        []vring
	backend      *backendChannel
	inflight     *inflightArea // the in-flight area (INFLIGHT_SHMFD), if any
	// replyFile is a descriptor a handler sends with its reply (and the
	// session closes after sending).
	replyFile *os.File
	dirty     *dirtyLog
	// share arbitrates the device with another front-end's session (a
	// live migration's other end).
	share *deviceShare
	// closing is set when the connection is being torn down; peerGone
	// reports whether the front-end closed its end (nil: never). Either
	// makes the session ending: a new session waits for its rings instead
	// of being refused (see deviceShare.acquireRings).
	closing  atomic.Bool
	peerGone func() bool
	// replaying: the session is being rebuilt from a hand-over's requests,
	// so any failure of one is returned instead of acknowledged.
	replaying bool
}

// ending reports whether the session's front-end is gone or going, so
// that its rings are about to stop. Safe from any goroutine.
func (s *session) ending() bool {
	return s.closing.Load() || s.peerGone != nil && s.peerGone()
}

func newSession(log *slog.Logger, dev Device, out messageWriter) *session {
	n := dev.NumQueues()
	if n < 1 {
		n = 1
	}
	if n > MaxRings {
		n = MaxRings
	}
	s := &session{
		log:          log,
		dev:          dev,
		out:          out,
		offered:      dev.Features() | 1<<FeatureProtocolFeatures | 1<<FeatureLogAll,
		offeredProto: OfferedProtocolFeatures,
		rings:        make([]vring, n),
		dirty:        &dirtyLog{},
		share:        newDeviceShare(dev),
	}
	for i := range s.rings {
		s.rings[i].dirty = &ringDirtyLog{log: s.dirty}
	}
	return s
}

func (s *session) replyAck() bool { return s.protocol&(1<<ProtoReplyAck) != 0 }

// fatalError marks errors after which the connection must be closed.
type fatalError struct{ err error }

func (e fatalError) Error() string { return e.err.Error() }
func (e fatalError) Unwrap() error { return e.err }

// handler handles one request. reply is the payload of the request's own
// reply, for requests that have one.
type handler struct {
	fn       func(s *session, m *Message) (reply []byte, err error)
	hasReply bool
	size     int // exact payload size; -1: checked by fn
	fds      int // exact descriptor count; -1: checked by fn
	// proto is the protocol feature the request belongs to: it is refused
	// unless that feature was negotiated. noProto: always allowed.
	proto int
}

const noProto = -1

var handlers = map[Request]handler{
	ReqGetFeatures:         {(*session).getFeatures, true, 0, 0, noProto},
	ReqSetFeatures:         {(*session).setFeatures, false, 8, 0, noProto},
	ReqSetOwner:            {(*session).setOwner, false, 0, 0, noProto},
	ReqResetOwner:          {(*session).resetDevice, false, 0, 0, noProto},
	ReqResetDevice:         {(*session).resetDevice, false, 0, 0, ProtoResetDevice},
	ReqGetProtocolFeatures: {(*session).getProtocolFeatures, true, 0, 0, noProto},
	ReqSetProtocolFeatures: {(*session).setProtocolFeatures, false, 8, 0, noProto},
	ReqGetQueueNum:         {(*session).getQueueNum, true, 0, 0, noProto},
	ReqGetMaxMemSlots:      {(*session).getMaxMemSlots, true, 0, 0, ProtoConfigureMemSlots},
	ReqSetMemTable:         {(*session).setMemTable, false, -1, -1, noProto},
	ReqSetLogBase:          {(*session).setLogBase, true, logBaseSize, 1, ProtoLogShmfd},
	ReqSetLogFd:            {(*session).setLogFd, false, 0, 1, ProtoLogShmfd},
	ReqAddMemReg:           {(*session).addMemReg, false, 8 + memoryRegionSize, 1, ProtoConfigureMemSlots},
	ReqRemMemReg:           {(*session).remMemReg, false, 8 + memoryRegionSize, -1, ProtoConfigureMemSlots},
	ReqSetVringNum:         {(*session).setVringNum, false, 8, 0, noProto},
	ReqSetVringAddr:        {(*session).setVringAddr, false, vringAddrSize, 0, noProto},
	ReqSetVringBase:        {(*session).setVringBase, false, 8, 0, noProto},
	ReqGetVringBase:        {(*session).getVringBase, true, 8, 0, noProto},
	ReqSetVringKick:        {(*session).setVringKick, false, 8, -1, noProto},
	ReqSetVringCall:        {(*session).setVringCall, false, 8, -1, noProto},
	ReqSetVringErr:         {(*session).setVringErr, false, 8, -1, noProto},
	ReqSetVringEnable:      {(*session).setVringEnable, false, 8, 0, noProto},
	ReqGetConfig:           {(*session).getConfig, true, -1, 0, ProtoConfig},
	ReqSetConfig:           {(*session).setConfig, false, -1, 0, ProtoConfig},
	ReqSetBackendReqFd:     {(*session).setBackendReqFd, false, 0, 1, ProtoBackendReq},
	ReqSetStatus:           {(*session).setStatus, false, 8, 0, ProtoStatus},
	ReqGetStatus:           {(*session).getStatus, true, 0, 0, ProtoStatus},
	ReqGetInflightFd:       {(*session).getInflightFd, true, inflightSize, 0, ProtoInflightShmfd},
	ReqSetInflightFd:       {(*session).setInflightFd, false, inflightSize, 1, ProtoInflightShmfd},
}

// dispatch handles one message and sends its reply or acknowledgement.
// Descriptors the handler did not take are closed. A returned error means
// the connection must be closed; failures the front-end can be told about
// are acknowledged with a failure (REPLY_ACK) and logged instead.
func (s *session) dispatch(m *Message) error {
	defer m.CloseFiles()
	h := m.Header
	if h.IsReply() {
		return fmt.Errorf("%v: unexpected reply flag from the front-end", h.Request)
	}
	hd, ok := handlers[h.Request]
	var reply []byte
	var err error
	switch {
	case !ok:
		err = fmt.Errorf("unsupported request %v", h.Request)
		if !(h.NeedReply() && s.replyAck()) {
			// The front-end may wait for a reply we cannot give.
			return fatalError{err}
		}
	case hd.proto != noProto && s.protocol&(1<<hd.proto) == 0:
		err = fmt.Errorf("%v: its protocol feature (bit %d) was not negotiated", h.Request, hd.proto)
	case hd.size >= 0 && len(m.Payload) != hd.size:
		err = fmt.Errorf("%v: payload of %d bytes, want %d", h.Request, len(m.Payload), hd.size)
	case hd.fds >= 0 && len(m.Files) != hd.fds:
		err = fmt.Errorf("%v: %d file descriptors, want %d", h.Request, len(m.Files), hd.fds)
	default:
		reply, err = hd.fn(s, m)
	}
	var replyFiles []*os.File
	if f := s.replyFile; f != nil {
		s.replyFile = nil
		defer f.Close()
		replyFiles = []*os.File{f}
	}
	var fe fatalError
	if errors.As(err, &fe) || err != nil && s.replaying {
		return err
	}
	if hd.hasReply {
		if err != nil {
			if h.Request == ReqGetConfig {
				// QEMU treats a reply of the wrong size as a failed read.
				s.log.Warn("request failed", "request", h.Request.String(), "err", err)
				return s.reply(h, nil)
			}
			return err
		}
		return s.reply(h, reply, replyFiles...)
	}
	if err != nil {
		s.log.Warn("request failed", "request", h.Request.String(), "err", err)
	}
	if h.NeedReply() && s.replyAck() {
		var status uint64
		if err != nil {
			status = 1
		}
		return s.reply(h, EncodeU64(status))
	}
	return nil
}

func (s *session) reply(h Header, payload []byte, files ...*os.File) error {
	if err := s.out.Write(Header{Request: h.Request, Flags: FlagReply}, payload, files...); err != nil {
		return fmt.Errorf("reply to %v: %w", h.Request, err)
	}
	return nil
}

// ring returns ring idx after checking the index.
func (s *session) ring(idx uint64) (*vring, int, error) {
	if idx >= uint64(len(s.rings)) {
		return nil, 0, fmt.Errorf("ring index %d out of range (%d rings)", idx, len(s.rings))
	}
	return &s.rings[idx], int(idx), nil
}

func (s *session) getFeatures(*Message) ([]byte, error) { return EncodeU64(s.offered), nil }

func (s *session) setFeatures(m *Message) ([]byte, error) {
	v, _ := DecodeU64(m.Payload)
	if extra := v &^ s.offered; extra != 0 {
		return nil, fmt.Errorf("features %#x were not offered", extra)
	}
	// Queues read the features at start: restart running ones. LOG_ALL
	// is the exception: a migration turns it on and off under running
	// rings, and the rings' logs follow it without a restart.
	changed := (v^s.features)&^(1<<FeatureLogAll) != 0
	if changed {
		if err := s.stopAll(); err != nil {
			return nil, err
		}
	}
	if logAll := v&(1<<FeatureLogAll) != 0; logAll != (s.features&(1<<FeatureLogAll) != 0) {
		s.dirty.setLogAll(logAll)
		s.log.Info("dirty logging", "on", logAll)
		if n := s.dirty.outside.Swap(0); n > 0 {
			s.log.Error("writes outside the dirty log were not logged", "marks", n)
		}
	}
	s.features = v
	if v&(1<<FeatureProtocolFeatures) == 0 {
		// Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings
		// are enabled from here on. SET_FEATURES never disables a ring.
		for i := range s.rings {
			s.rings[i].enabled = true
		}
	}
	if changed {
		s.log.Info("features negotiated", "features", fmt.Sprintf("%#x", v))
	}
	s.startReady()
	return nil, nil
}

func (s *session) setOwner(*Message) ([]byte, error) { return nil, nil }

// resetDevice (RESET_DEVICE, and the older RESET_OWNER) returns rings and
// negotiated device state to their initial values. The memory table,
// protocol features and the back-end channel belong to the connection and
// stay.
func (s *session) resetDevice(*Message) ([]byte, error) {
	if err := s.stopAll(); err != nil {
		return nil, err
	}
	for i := range s.rings {
		s.rings[i].closeFiles()
		s.rings[i] = vring{dirty: &ringDirtyLog{log: s.dirty}}
	}
	s.dirty.setLogAll(false)
	s.setInflightArea(nil)
	s.features = 0
	s.status = 0
	s.log.Info("device reset")
	return nil, nil
}

func (s *session) getProtocolFeatures(*Message) ([]byte, error) {
	return EncodeU64(s.offeredProto), nil
}

func (s *session) setProtocolFeatures(m *Message) ([]byte, error) {
	v, _ := DecodeU64(m.Payload)
	if extra := v &^ s.offeredProto; extra != 0 {
		return nil, fmt.Errorf("protocol features %#x were not offered", extra)
	}
	s.protocol = v
	s.log.Info("protocol features negotiated", "protocol_features", fmt.Sprintf("%#x", v))
	return nil, nil
}

func (s *session) getQueueNum(*Message) ([]byte, error) {
	return EncodeU64(uint64(len(s.rings))), nil
}

func (s *session) getMaxMemSlots(*Message) ([]byte, error) { return EncodeU64(MaxMemSlots), nil }

// changeMemory installs a new memory table: every running ring is
// stopped first (so no queue touches memory that goes away), the old
// regions in unmap are unmapped, and the rings are started again. If a
// ring does not stop, nothing changes and the error is fatal.
func (s *session) changeMemory(mem *guestMemory, unmap []*mappedRegion) error {
	if !s.dirty.covers(mem.end()) {
		// The front-end grows its log before its memory table; a table
		// the log cannot cover would lose dirty pages silently.
		s.log.Error("memory table reaches beyond the dirty log: writes there are not logged",
			"memory_end", fmt.Sprintf("%#x", mem.end()))
	}
	if err := s.stopAll(); err != nil {
		return err
	}
	s.mem = mem
	for _, r := range unmap {
		r.unmap()
	}
	s.log.Info("memory table changed", "regions", mem.len())
	s.startReady()
	return nil
}

func (s *session) setMemTable(m *Message) ([]byte, error) {
	regs, err := DecodeMemTable(m.Payload)
	if err != nil {
		return nil, fmt.Errorf("SET_MEM_TABLE: %w", err)
	}
	if want := 8 + len(regs)*memoryRegionSize; len(m.Payload) != want {
		return nil, fmt.Errorf("SET_MEM_TABLE: payload of %d bytes for %d regions, want %d", len(m.Payload), len(regs), want)
	}
	if len(m.Files) != len(regs) {
		return nil, fmt.Errorf("SET_MEM_TABLE: %d file descriptors for %d regions", len(m.Files), len(regs))
	}
	mapped := make([]*mappedRegion, 0, len(regs))
	fail := func(err error) ([]byte, error) {
		for _, r := range mapped {
			r.unmap()
		}
		return nil, fmt.Errorf("SET_MEM_TABLE: %w", err)
	}
	for i, r := range regs {
		mr, err := mapRegion(r, m.Files[i])
		if err != nil {
			return fail(err)
		}
		mapped = append(mapped, mr)
	}
	if err := checkRegions(mapped); err != nil {
		return fail(err)
	}
	var old []*mappedRegion
	if s.mem != nil {
		old = s.mem.regions
	}
	if err := s.changeMemory(&guestMemory{regions: mapped}, old); err != nil {
		for _, r := range mapped {
			r.unmap()
		}
		return nil, err
	}
	return nil, nil
}

func (s *session) addMemReg(m *Message) ([]byte, error) {
	r, _ := DecodeSingleRegion(m.Payload)
	if s.mem.len() >= MaxMemSlots {
		return nil, fmt.Errorf("ADD_MEM_REG: all %d memory slots in use", MaxMemSlots)
	}
	mr, err := mapRegion(r, m.Files[0])
	if err != nil {
		return nil, fmt.Errorf("ADD_MEM_REG: %w", err)
	}
	mem, err := s.mem.with(mr)
	if err != nil {
		mr.unmap()
		return nil, fmt.Errorf("ADD_MEM_REG: %w", err)
	}
	if err := s.changeMemory(mem, nil); err != nil {
		mr.unmap()
		return nil, err
	}
	return nil, nil
}

func (s *session) remMemReg(m *Message) ([]byte, error) {
	// The spec asks for no descriptor but allows one for compatibility
	// with older front-ends; it is closed unused.
	if len(m.Files) > 1 {
		return nil, fmt.Errorf("REM_MEM_REG: %d file descriptors, want at most 1", len(m.Files))
	}
	r, _ := DecodeSingleRegion(m.Payload)
	mem, removed, err := s.mem.without(r)
	if err != nil {
		return nil, fmt.Errorf("REM_MEM_REG: %w", err)
	}
	return nil, s.changeMemory(mem, []*mappedRegion{removed})
}

func (s *session) setVringNum(m *Message) ([]byte, error) {
	st, _ := DecodeVringState(m.Payload)
	r, idx, err := s.ring(uint64(st.Index))
	if err != nil {
		return nil, err
	}
	if r.running {
		return nil, fmt.Errorf("ring %d: size change while running", idx)
	}
	max := s.maxQueueSize()
	if st.Num == 0 || st.Num&(st.Num-1) != 0 || st.Num > uint32(max) {
		return nil, fmt.Errorf("ring %d: size %d is not a power of two in 1..%d", idx, st.Num, max)
	}
	r.num = uint16(st.Num)
	return nil, nil
}

func (s *session) setVringAddr(m *Message) ([]byte, error) {
	a, _ := DecodeVringAddr(m.Payload)
	r, idx, err := s.ring(uint64(a.Index))
	if err != nil {
		return nil, err
	}
	if a.Flags&^VringFlagLog != 0 {
		return nil, fmt.Errorf("ring %d: unknown address flags %#x", idx, a.Flags)
	}
	if r.running {
		// A migration turns the used ring's logging on and off with the
		// same addresses: that changes the log, not the ring.
		same := a.DescUser == r.addr.DescUser && a.AvailUser == r.addr.AvailUser && a.UsedUser == r.addr.UsedUser
		if !same {
			return nil, fmt.Errorf("ring %d: address change while running", idx)
		}
		if a.Flags&VringFlagLog != 0 && a.LogGuest != r.usedGPA {
			// Logged where the front-end says; a mismatch means its
			// log will not show the used ring's pages.
			s.log.Warn("log_guest_addr is not the used ring's guest address", "ring", idx,
				"log_guest_addr", fmt.Sprintf("%#x", a.LogGuest), "used", fmt.Sprintf("%#x", r.usedGPA))
		}
		r.dirty.set(a)
		r.addr = a
		return nil, nil
	}
	if a.DescUser%16 != 0 || a.AvailUser%2 != 0 || a.UsedUser%4 != 0 {
		return nil, fmt.Errorf("ring %d: misaligned ring addresses desc %#x avail %#x used %#x",
			idx, a.DescUser, a.AvailUser, a.UsedUser)
	}
	if r.num != 0 && s.mem != nil {
		// Report bad addresses now; they are checked again at start.
		if _, _, _, err := s.translateRing(a, r.num); err != nil {
			return nil, fmt.Errorf("ring %d: %w", idx, err)
		}
	}
	r.addr, r.addrSet = a, true
	r.dirty.set(a)
	return nil, nil
}

func (s *session) setVringBase(m *Message) ([]byte, error) {
	st, _ := DecodeVringState(m.Payload)
	r, idx, err := s.ring(uint64(st.Index))
	if err != nil {
		return nil, err
	}
	if r.running {
		return nil, fmt.Errorf("ring %d: base change while running", idx)
	}
	if st.Num > 0xffff {
		return nil, fmt.Errorf("ring %d: base %#x does not fit a split ring index", idx, st.Num)
	}
	r.base = uint16(st.Num)
	return nil, nil
}

// getVringBase stops the ring and reports where it stopped. The ring
// starts again only with a new SET_VRING_KICK.
func (s *session) getVringBase(m *Message) ([]byte, error) {
	st, _ := DecodeVringState(m.Payload)
	r, idx, err := s.ring(uint64(st.Index))
	if err != nil {
		return nil, fatalError{err}
	}
	if err := s.stopRing(idx); err != nil {
		return nil, err
	}
	r.kick.Close()
	r.kick = nil
	r.kickSet = false
	return VringState{Index: st.Index, Num: uint32(r.base)}.Encode(), nil
}

// ringFile decodes the payload of SET_VRING_KICK/CALL/ERR and takes the
// descriptor from the message (nil with the no-fd flag).
func (s *session) ringFile(m *Message) (*vring, int, *os.File, error) {
	v, _ := DecodeU64(m.Payload)
	if v&^(VringIndexMask|VringNoFd) != 0 {
		return nil, 0, nil, fmt.Errorf("%v: unknown bits in %#x", m.Header.Request, v)
	}
	r, idx, err := s.ring(v & VringIndexMask)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("%v: %w", m.Header.Request, err)
	}
	want := 1
	if v&VringNoFd != 0 {
		want = 0
	}
	if len(m.Files) != want {
		return nil, 0, nil, fmt.Errorf("%v: %d file descriptors, want %d", m.Header.Request, len(m.Files), want)
	}
	var f *os.File
	if want == 1 {
		f, m.Files[0] = m.Files[0], nil
	}
	return r, idx, f, nil
}

// ringEventfd is ringFile for a kick or call eventfd, taken out of Go's
// poller.
func (s *session) ringEventfd(m *Message) (*vring, int, *eventfd.FD, error) {
	r, idx, f, err := s.ringFile(m)
	if err != nil {
		return nil, 0, nil, err
	}
	e, err := eventfd.Adopt(f)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("%v: %w", m.Header.Request, err)
	}
	return r, idx, e, nil
}

func (s *session) setVringKick(m *Message) ([]byte, error) {
	r, idx, f, err := s.ringEventfd(m)
	if err != nil {
		return nil, err
	}
	if err := s.stopRing(idx); err != nil {
		f.Close()
		return nil, err
	}
	r.kick.Close()
	r.kick, r.kickSet = f, true
	s.startRing(idx)
	return nil, nil
}

func (s *session) setVringCall(m *Message) ([]byte, error) {
	r, idx, f, err := s.ringEventfd(m)
	if err != nil {
		return nil, err
	}
	// A running ring switches to the new fd without stopping: QEMU sends
	// SET_VRING_CALL while the guest runs (interrupt masking), and a stop
	// would wait for every request in flight on this goroutine.
	if r.running {
		if err := s.dev.SetQueueCall(idx, f); err != nil {
			f.Close()
			return nil, fmt.Errorf("ring %d: new call fd: %w", idx, err)
		}
	}
	// The device no longer signals the old fd once SetQueueCall returned
	// (a signal under way holds its own reference).
	r.call.Close()
	r.call = f
	return nil, nil
}

func (s *session) setVringErr(m *Message) ([]byte, error) {
	r, _, f, err := s.ringFile(m)
	if err != nil {
		return nil, err
	}
	// Kept (and closed) only: the device reports errors by status codes.
	if r.errFd != nil {
		r.errFd.Close()
	}
	r.errFd = f
	return nil, nil
}

func (s *session) setVringEnable(m *Message) ([]byte, error) {
	st, _ := DecodeVringState(m.Payload)
	r, idx, err := s.ring(uint64(st.Index))
	if err != nil {
		return nil, err
	}
	if st.Num > 1 {
		return nil, fmt.Errorf("ring %d: enable value %d is not 0 or 1", idx, st.Num)
	}
	r.enabled = st.Num == 1
	if r.enabled {
		s.startRing(idx)
		return nil, nil
	}
	return nil, s.stopRing(idx)
}

func (s *session) getConfig(m *Message) ([]byte, error) {
	c, err := DecodeConfigSpace(m.Payload)
	if err != nil {
		return nil, fmt.Errorf("GET_CONFIG: %w", err)
	}
	if len(m.Payload) != 12+len(c.Data) {
		return nil, fmt.Errorf("GET_CONFIG: payload of %d bytes for %d config bytes", len(m.Payload), len(c.Data))
	}
	out := ConfigSpace{Offset: c.Offset, Flags: c.Flags, Data: make([]byte, len(c.Data))}
	s.dev.ReadConfig(out.Data, c.Offset)
	return out.Encode(), nil
}

func (s *session) setConfig(m *Message) ([]byte, error) {
	c, err := DecodeConfigSpace(m.Payload)
	if err != nil {
		return nil, fmt.Errorf("SET_CONFIG: %w", err)
	}
	if len(m.Payload) != 12+len(c.Data) {
		return nil, fmt.Errorf("SET_CONFIG: payload of %d bytes for %d config bytes", len(m.Payload), len(c.Data))
	}
	if err := s.dev.WriteConfig(append([]byte(nil), c.Data...), c.Offset); err != nil {
		return nil, fmt.Errorf("SET_CONFIG at %d (%d bytes): %w", c.Offset, len(c.Data), err)
	}
	return nil, nil
}

func (s *session) setBackendReqFd(m *Message) ([]byte, error) {
	b, err := newBackendChannel(m.Files[0], s.replyAck())
	if err != nil {
		return nil, fmt.Errorf("SET_BACKEND_REQ_FD: %w", err)
	}
	if s.backend != nil {
		s.backend.close()
	}
	s.backend = b
	s.share.setNotifier(s, b.notifyConfigChange)
	s.log.Info("back-end request channel set up")
	return nil, nil
}

func (s *session) setStatus(m *Message) ([]byte, error) {
	v, _ := DecodeU64(m.Payload)
	if v > 0xff {
		return nil, fmt.Errorf("SET_STATUS: status %#x does not fit a byte", v)
	}
	// Recorded only: QEMU 7.2 may send status 0 before GET_VRING_BASE, so
	// rings are stopped by GET_VRING_BASE and SET_VRING_ENABLE, not here.
	s.status = uint8(v)
	return nil, nil
}

func (s *session) getStatus(*Message) ([]byte, error) { return EncodeU64(uint64(s.status)), nil }

// translateRing maps the ring areas of a ring of n entries into host
// memory, checking that each lies wholly inside one region.
func (s *session) translateRing(a VringAddr, n uint16) (desc, avail, used []byte, err error) {
	availSize, usedSize := virtio.AvailRingSize(n), virtio.UsedRingSize(n)
	if s.features&(1<<virtio.FeatureEventIdx) == 0 {
		// used_event and avail_event exist only with EVENT_IDX.
		availSize -= 2
		usedSize -= 2
	}
	if desc, err = s.mem.userRange(a.DescUser, virtio.DescTableSize(n)); err != nil {
		return nil, nil, nil, fmt.Errorf("descriptor table: %w", err)
	}
	if avail, err = s.mem.userRange(a.AvailUser, availSize); err != nil {
		return nil, nil, nil, fmt.Errorf("available ring: %w", err)
	}
	if used, err = s.mem.userRange(a.UsedUser, usedSize); err != nil {
		return nil, nil, nil, fmt.Errorf("used ring: %w", err)
	}
	return desc, avail, used, nil
}

// startRing starts ring idx on the device if it is ready: enabled, kick
// received, size and addresses set, and guest memory mapped.
func (s *session) startRing(idx int) {
	r := &s.rings[idx]
	if r.running || !r.enabled || !r.kickSet || !r.addrSet || r.num == 0 || s.mem.len() == 0 {
		return
	}
	desc, avail, used, err := s.translateRing(r.addr, r.num)
	if err != nil {
		s.log.Warn("ring not started", "ring", idx, "err", err)
		return
	}
	// translateRing found each area inside a region: these succeed.
	r.descGPA, _ = s.mem.userToGuest(r.addr.DescUser)
	r.availGPA, _ = s.mem.userToGuest(r.addr.AvailUser)
	r.usedGPA, _ = s.mem.userToGuest(r.addr.UsedUser)
	q := virtio.QueueSetup{
		Index: idx, Size: r.num,
		Desc: desc, Avail: avail, Used: used,
		LastAvail: r.base,
		Features:  s.features,
		Mem:       s.mem,
		Kick:      r.kick, Call: r.call,
		DirtyLog: r.dirty,
		// Session goroutine only, as is StopQueue.
		Migrating: s.dirty.migrating,
	}
	if !s.share.acquireRings(s) {
		s.log.Warn("ring not started: another front-end runs this device's rings (one at a time: a migration's destination starts once the source has stopped)", "ring", idx)
		return
	}
	if r.inflight != nil {
		if err := r.inflight.check(r.num); err != nil {
			s.log.Warn("ring not started", "ring", idx, "err", err)
			return
		}
		q.Inflight = r.inflight
	}
	if err := s.dev.StartQueue(q); err != nil {
		s.log.Warn("ring not started", "ring", idx, "err", err)
		s.releaseIfIdle()
		return
	}
	r.desc, r.avail, r.used = desc, avail, used
	r.running = true
	s.log.Info("ring started", "ring", idx, "size", r.num, "avail", r.base)
}

// stopRing stops ring idx if it runs and keeps the index to resume from.
// A ring the device fails to stop may still touch guest memory: it is
// marked stuck and the error is fatal, so that the connection is closed
// with the memory left mapped instead of changed under running I/O.
func (s *session) stopRing(idx int) error {
	r := &s.rings[idx]
	if !r.running {
		return nil
	}
	last, err := s.dev.StopQueue(idx)
	if err != nil {
		r.stuck = true
		return fatalError{fmt.Errorf("ring %d did not stop: %w", idx, err)}
	}
	r.running = false
	r.desc, r.avail, r.used = nil, nil, nil
	r.base = last
	s.log.Info("ring stopped", "ring", idx, "avail", last)
	s.releaseIfIdle()
	return nil
}

// releaseIfIdle lets another front-end run the device's rings once none of
// this session's runs (a stuck ring keeps them).
func (s *session) releaseIfIdle() {
	for i := range s.rings {
		if s.rings[i].running || s.rings[i].stuck {
			return
		}
	}
	s.share.releaseRings(s)
}

// stopAll stops every running ring; the first failure is returned (fatal)
// after trying the others.
func (s *session) stopAll() error {
	var first error
	for i := range s.rings {
		if err := s.stopRing(i); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// startReady starts every ring that is ready.
func (s *session) startReady() {
	for i := range s.rings {
		s.startRing(i)
	}
}

// close releases everything the connection holds: rings stopped, their
// descriptors closed, the back-end channel closed, guest memory unmapped.
// A ring that did not stop keeps its descriptors, and guest memory stays
// mapped (leaked) for as long as the process lives: the device may still
// use them.
func (s *session) close() {
	s.closing.Store(true)
	stuck := s.stopAll() != nil
	for i := range s.rings {
		if r := &s.rings[i]; r.running || r.stuck {
			stuck = true
			continue
		}
		s.rings[i].closeFiles()
	}
	if s.backend != nil {
		s.share.setNotifier(s, nil)
		s.backend.close()
		s.backend = nil
	}
	if stuck {
		s.log.Error("a ring did not stop: guest memory stays mapped and its descriptors open")
		return
	}
	s.setInflightArea(nil)
	s.mem.unmapAll()
	s.mem = nil
	s.dirty.close()
}

// setLogBase maps the dirty log (SET_LOG_BASE with LOG_SHMFD). The
// front-end waits for the reply; a log that cannot be used closes the
// connection (the migration then fails: it must not go on without one).
func (s *session) setLogBase(m *Message) ([]byte, error) {
	lb, err := DecodeLogBase(m.Payload)
	if err != nil {
		return nil, fmt.Errorf("SET_LOG_BASE: %w", err)
	}
	if end := s.mem.end(); logBytesFor(end) > lb.MmapSize {
		return nil, fmt.Errorf("SET_LOG_BASE: a log of %d bytes does not cover guest memory up to %#x (%d bytes needed)",
			lb.MmapSize, end, logBytesFor(end))
	}
	mapping, bits, err := mapLog(lb, m.Files[0])
	if err != nil {
		return nil, fmt.Errorf("SET_LOG_BASE: %w", err)
	}
	s.dirty.replace(mapping, bits)
	s.log.Info("dirty log mapped", "bytes", lb.MmapSize)
	return EncodeU64(0), nil
}

// setLogFd keeps the eventfd that is signalled after the log is written.
func (s *session) setLogFd(m *Message) ([]byte, error) {
	f := m.Files[0]
	m.Files[0] = nil
	s.dirty.setCall(f)
	return nil, nil
}

// getInflightFd (GET_INFLIGHT_FD) makes a new, empty in-flight area for
// the queues and queue size the front-end asks for and hands it over; the
// front-end keeps it and gives it back with SET_INFLIGHT_FD, to this
// process or the next one. The session uses it from now on.
func (s *session) getInflightFd(m *Message) ([]byte, error) {
	in, _ := DecodeInflight(m.Payload)
	if err := validateInflight(in, len(s.rings), s.maxQueueSize(), false); err != nil {
		return nil, fatalError{fmt.Errorf("GET_INFLIGHT_FD: %w", err)}
	}
	if s.anyRunning() {
		return nil, fatalError{errors.New("GET_INFLIGHT_FD while rings run")}
	}
	a, f, err := createInflightArea(int(in.NumQueues), in.QueueSize)
	if err != nil {
		return nil, fatalError{fmt.Errorf("GET_INFLIGHT_FD: %w", err)}
	}
	s.setInflightArea(a)
	s.replyFile = f
	in.MmapSize, in.MmapOffset = uint64(len(a.mapping)), 0
	s.log.Info("in-flight area created", "queues", in.NumQueues, "queue_size", in.QueueSize, "bytes", in.MmapSize)
	return in.Encode(), nil
}

// setInflightFd (SET_INFLIGHT_FD) maps the area the front-end kept. Its
// contents are checked when each ring starts.
func (s *session) setInflightFd(m *Message) ([]byte, error) {
	in, _ := DecodeInflight(m.Payload)
	if err := validateInflight(in, len(s.rings), s.maxQueueSize(), true); err != nil {
		return nil, fmt.Errorf("SET_INFLIGHT_FD: %w", err)
	}
	if s.anyRunning() {
		return nil, errors.New("SET_INFLIGHT_FD while rings run")
	}
	a, err := mapInflightArea(in, m.Files[0])
	if err != nil {
		return nil, fmt.Errorf("SET_INFLIGHT_FD: %w", err)
	}
	s.setInflightArea(a)
	s.log.Info("in-flight area set", "queues", in.NumQueues, "queue_size", in.QueueSize)
	return nil, nil
}

// setInflightArea replaces the in-flight area (nil: none) and hands each
// ring its queue region. Rings are stopped.
func (s *session) setInflightArea(a *inflightArea) {
	if s.inflight != nil {
		s.inflight.unmap()
	}
	s.inflight = a
	for i := range s.rings {
		s.rings[i].inflight = nil
		if a != nil && i < len(a.queues) {
			s.rings[i].inflight = a.queues[i]
		}
	}
}

func (s *session) anyRunning() bool {
	for i := range s.rings {
		if s.rings[i].running {
			return true
		}
	}
	return false
}

// maxQueueSize is the largest ring accepted.
func (s *session) maxQueueSize() int {
	return min(s.dev.MaxQueueSize(), virtio.MaxQueueSize)
}
