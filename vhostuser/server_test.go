package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/eventfd"
	"github.com/thinblk/thinblk/virtio"

	"github.com/thinblk/thinblk/internal/testenv"
)

func TestNegotiation(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	c := dial(t, ts.path)

	if got, want := c.getU64(ReqGetFeatures), dev.features|1<<FeatureProtocolFeatures|1<<FeatureLogAll; got != want {
		t.Errorf("GET_FEATURES = %#x, want %#x", got, want)
	}
	proto := c.getU64(ReqGetProtocolFeatures)
	for _, bit := range []int{ProtoMQ, ProtoReplyAck, ProtoConfig, ProtoBackendReq, ProtoConfigureMemSlots, ProtoResetDevice, ProtoStatus, ProtoLogShmfd, ProtoInflightShmfd} {
		if proto&(1<<bit) == 0 {
			t.Errorf("protocol feature %d not offered (%#x)", bit, proto)
		}
	}
	if proto&(1<<ProtoPagefault) != 0 {
		t.Errorf("unsupported protocol features offered: %#x", proto)
	}
	c.mustSend(ReqSetProtocolFeatures, EncodeU64(proto))
	c.ack = true
	if got := c.getU64(ReqGetQueueNum); got != 2 {
		t.Errorf("GET_QUEUE_NUM = %d, want 2", got)
	}
	if got := c.getU64(ReqGetMaxMemSlots); got != MaxMemSlots {
		t.Errorf("GET_MAX_MEM_SLOTS = %d, want %d", got, MaxMemSlots)
	}
	if err := c.send(ReqSetFeatures, EncodeU64(1<<40)); err == nil {
		t.Error("SET_FEATURES with a feature not offered succeeded")
	}
	if err := c.send(ReqSetProtocolFeatures, EncodeU64(1<<ProtoPagefault)); err == nil {
		t.Error("SET_PROTOCOL_FEATURES with a feature not offered succeeded")
	}
	c.mustSend(ReqSetOwner, nil)
	c.mustSend(ReqSetFeatures, EncodeU64(dev.features|1<<FeatureProtocolFeatures))
	c.mustSend(ReqSetStatus, EncodeU64(0x0f))
	if got := c.getU64(ReqGetStatus); got != 0x0f {
		t.Errorf("GET_STATUS = %#x, want 0xf", got)
	}
	if err := c.send(ReqSetStatus, EncodeU64(0x100)); err == nil {
		t.Error("SET_STATUS with a status wider than a byte succeeded")
	}
	ts.log.WaitContains(t, "features negotiated")
}

func TestConfigSpace(t *testing.T) {
	dev, _, c := negotiated(t)

	c.write(ReqGetConfig, 0, ConfigSpace{Offset: 8, Data: make([]byte, 16)}.Encode())
	cs, err := DecodeConfigSpace(c.read(ReqGetConfig).Payload)
	if err != nil {
		t.Fatal(err)
	}
	if cs.Offset != 8 || len(cs.Data) != 16 || cs.Data[0] != 8 || cs.Data[15] != 23 {
		t.Errorf("GET_CONFIG = offset %d data %v", cs.Offset, cs.Data)
	}
	c.mustSend(ReqSetConfig, ConfigSpace{Offset: 20, Data: []byte{0xaa, 0xbb}}.Encode())
	got := make([]byte, 2)
	dev.ReadConfig(got, 20)
	if got[0] != 0xaa || got[1] != 0xbb {
		t.Errorf("SET_CONFIG not applied: % x", got)
	}
	if err := c.send(ReqSetConfig, ConfigSpace{Offset: 0, Data: []byte{1}}.Encode()); err == nil {
		t.Error("SET_CONFIG of a field the device refuses succeeded")
	}
	// Out of range: QEMU sees a zero-sized reply as a failed read.
	bad := ConfigSpace{Offset: 250, Data: make([]byte, 16)}.Encode()
	c.write(ReqGetConfig, 0, bad)
	if m := c.read(ReqGetConfig); len(m.Payload) != 0 {
		t.Errorf("GET_CONFIG beyond config space: %d bytes of reply", len(m.Payload))
	}
}

func TestRingStartsWhenEnabled(t *testing.T) {
	dev, ts, c := negotiated(t)
	ram := newGuestRAM(t, ramSize)
	c.mustSend(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}}), ram.file)

	c.setupRing(t, 0, 128)
	if dev.numRunning() != 0 {
		t.Fatal("ring started before SET_VRING_ENABLE although PROTOCOL_FEATURES was negotiated")
	}
	c.mustSend(ReqSetVringEnable, VringState{Index: 0, Num: 1}.Encode())
	q, ok := dev.runningQueue(0)
	if !ok {
		t.Fatal("ring not started after SET_VRING_ENABLE")
	}
	if q.Size != 128 || q.LastAvail != 3 || q.Kick == nil || q.Call == nil || q.Mem == nil {
		t.Errorf("queue setup %+v", q)
	}
	// The areas handed over are the guest's bytes at the ring's address.
	copy(ram.mem[ringOff(0):], "desc")
	copy(ram.mem[ringOff(0)+0x8000:], "used")
	if desc, used := dev.ringPrefixes(0, 4); desc != "desc" || used != "used" {
		t.Error("ring areas do not alias guest memory")
	}
	if uint64(len(q.Avail)) != virtio.AvailRingSize(128) || uint64(len(q.Used)) != virtio.UsedRingSize(128) {
		t.Errorf("ring area sizes %d %d", len(q.Avail), len(q.Used))
	}
	// Guest-physical translation through the queue's Memory.
	copy(ram.mem[0x1234:], "hello")
	if b, err := dev.guestRange(0, 0x1234, 5); err != nil || b != "hello" {
		t.Errorf("Range = %q, %v", b, err)
	}
	if _, err := dev.guestRange(0, ramSize-2, 4); err == nil {
		t.Error("Range across the end of guest memory succeeded")
	}
	if _, err := dev.guestRange(0, ^uint64(0)-1, 4); err == nil {
		t.Error("wrapping Range succeeded")
	}

	// GET_VRING_BASE stops the ring and reports where the device stopped.
	c.write(ReqGetVringBase, 0, VringState{Index: 0}.Encode())
	st, err := DecodeVringState(c.read(ReqGetVringBase).Payload)
	if err != nil {
		t.Fatal(err)
	}
	if st.Index != 0 || st.Num != 3+7 {
		t.Errorf("GET_VRING_BASE = %+v, want index 0 base 10", st)
	}
	if dev.numRunning() != 0 {
		t.Fatal("ring still running after GET_VRING_BASE")
	}
	// A new kick restarts it from where it stopped.
	c.mustSend(ReqSetVringKick, EncodeU64(0), eventFd(t))
	if q, ok := dev.runningQueue(0); !ok || q.LastAvail != 10 {
		t.Fatalf("ring not restarted from 10 after SET_VRING_KICK: %v %d", ok, q.LastAvail)
	}
	// Disable stops it, enable starts it again.
	c.mustSend(ReqSetVringEnable, VringState{Index: 0, Num: 0}.Encode())
	if dev.numRunning() != 0 {
		t.Fatal("ring running after SET_VRING_ENABLE 0")
	}
	c.mustSend(ReqSetVringEnable, VringState{Index: 0, Num: 1}.Encode())
	if _, ok := dev.runningQueue(0); !ok {
		t.Fatal("ring not running after SET_VRING_ENABLE 1")
	}
	// A new call fd is handed to the running ring without stopping it
	// (a stop would wait for every request in flight).
	call := eventFd(t)
	nEvents := len(dev.eventLog())
	c.mustSend(ReqSetVringCall, EncodeU64(0), call)
	if q, ok := dev.runningQueue(0); !ok || q.Call == nil || !signalsTo(t, q.Call, call) {
		t.Fatal("ring not running with the new call fd")
	}
	if ev := dev.eventLog()[nEvents:]; !slices.Equal(ev, []string{"call 0"}) {
		t.Fatalf("device events after SET_VRING_CALL: %v, want only the swap", ev)
	}
	// The no-fd flag: a polled ring without a kick fd.
	c.mustSend(ReqSetVringKick, EncodeU64(VringNoFd))
	if q, ok := dev.runningQueue(0); !ok || q.Kick != nil {
		t.Fatalf("polled ring: running %v kick %v", ok, q.Kick)
	}
	ts.log.WaitContains(t, "ring started")
	ts.log.WaitContains(t, "ring stopped")
}

func TestRingsEnabledWithoutProtocolFeatures(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	c := dial(t, ts.path)
	c.negotiate(dev, false)
	ram := newGuestRAM(t, ramSize)
	c.mustSend(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}}), ram.file)
	c.setupRing(t, 1, 64)
	// No acknowledgements without REPLY_ACK: a GET orders us after the sets.
	c.getU64(ReqGetFeatures)
	q, ok := dev.runningQueue(1)
	if !ok {
		t.Fatal("ring not started at SET_VRING_KICK without PROTOCOL_FEATURES")
	}
	if q.Features&(1<<virtio.FeatureEventIdx) == 0 {
		t.Errorf("queue features %#x lack EVENT_IDX", q.Features)
	}
}

func TestReplyAck(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	c := dial(t, ts.path)
	// Before REPLY_ACK is negotiated NEED_REPLY is ignored: the next
	// message read is the reply to GET_QUEUE_NUM, not an ack.
	c.write(ReqSetOwner, FlagNeedReply, nil)
	if got := c.getU64(ReqGetQueueNum); got != 2 {
		t.Fatalf("GET_QUEUE_NUM = %d", got)
	}
	c.mustSend(ReqSetProtocolFeatures, EncodeU64(1<<ProtoReplyAck))
	c.ack = true
	c.mustSend(ReqSetOwner, nil)
	c.mustSend(ReqSetFeatures, EncodeU64(dev.features))
	// Requests with a reply of their own get only that reply.
	c.write(ReqGetFeatures, FlagNeedReply, nil)
	c.read(ReqGetFeatures)
	// Failures are acknowledged with a non-zero status and the session goes on.
	if err := c.send(ReqSetVringNum, VringState{Index: 0, Num: 100}.Encode()); err == nil {
		t.Error("ring size 100 (not a power of two) accepted")
	}
	if err := c.send(ReqSetVringNum, VringState{Index: 0, Num: 512}.Encode()); err == nil {
		t.Error("ring size above MaxQueueSize accepted")
	}
	if err := c.send(ReqSetVringNum, VringState{Index: 2, Num: 64}.Encode()); err == nil {
		t.Error("ring index beyond NumQueues accepted")
	}
	if err := c.send(ReqSetVringBase, VringState{Index: 0, Num: 1 << 16}.Encode()); err == nil {
		t.Error("ring base beyond 16 bits accepted")
	}
	if err := c.send(ReqSetVringEnable, VringState{Index: 0, Num: 2}.Encode()); err == nil {
		t.Error("SET_VRING_ENABLE 2 accepted")
	}
	// Unknown request with NEED_REPLY: failure ack, connection stays.
	if err := c.send(Request(99), nil); err == nil {
		t.Error("unknown request acknowledged as success")
	}
	c.mustSend(ReqSetVringNum, VringState{Index: 1, Num: 256}.Encode())
}

func setupMem(t *testing.T, c *client) *guestRAM {
	ram := newGuestRAM(t, ramSize)
	c.mustSend(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}}), ram.file)
	return ram
}

func TestMemoryTableValidation(t *testing.T) {
	dev, _, c := negotiated(t)
	ram := newGuestRAM(t, ramSize)
	ram2 := newGuestRAM(t, ramSize)
	table := func(regs ...MemoryRegion) []byte { return EncodeMemTable(regs) }
	half := uint64(ramSize / 2)
	cases := []struct {
		name    string
		payload []byte
		files   []*os.File
	}{
		{"overlap in guest memory", table(
			MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase},
			MemoryRegion{GuestPhysAddr: half, Size: ramSize, UserAddr: userBase + 4*ramSize}), []*os.File{ram.file, ram2.file}},
		{"overlap in user memory", table(
			MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase},
			MemoryRegion{GuestPhysAddr: 4 * ramSize, Size: ramSize, UserAddr: userBase + half}), []*os.File{ram.file, ram2.file}},
		{"region beyond the file", table(MemoryRegion{GuestPhysAddr: 0, Size: 2 * ramSize, UserAddr: userBase}), []*os.File{ram.file}},
		{"offset beyond the file", table(MemoryRegion{GuestPhysAddr: 0, Size: half, UserAddr: userBase, MmapOffset: ramSize}), []*os.File{ram.file}},
		{"empty region", table(MemoryRegion{GuestPhysAddr: 0, Size: 0, UserAddr: userBase}), []*os.File{ram.file}},
		{"wrapping region", table(MemoryRegion{GuestPhysAddr: ^uint64(0) - 0xfff, Size: 0x2000, UserAddr: userBase}), []*os.File{ram.file}},
		{"fewer fds than regions", table(
			MemoryRegion{GuestPhysAddr: 0, Size: half, UserAddr: userBase},
			MemoryRegion{GuestPhysAddr: half, Size: half, UserAddr: userBase + half, MmapOffset: half}), []*os.File{ram.file}},
		{"more fds than regions", table(MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}), []*os.File{ram.file, ram2.file}},
		{"no regions", table(), nil},
		{"trailing bytes", append(table(MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}), 0), []*os.File{ram.file}},
		{"not a mappable fd", table(MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}), []*os.File{eventFd(t)}},
	}
	for _, tc := range cases {
		if err := c.send(ReqSetMemTable, tc.payload, tc.files...); err == nil {
			t.Errorf("%s: SET_MEM_TABLE accepted", tc.name)
		}
	}
	// A valid table with two regions from one file at different offsets.
	c.mustSend(ReqSetMemTable, table(
		MemoryRegion{GuestPhysAddr: 0, Size: half, UserAddr: userBase},
		MemoryRegion{GuestPhysAddr: 1 << 32, Size: half, UserAddr: userBase + half, MmapOffset: half}), ram.file, ram.file)

	// Ring addresses: misaligned, outside memory, straddling two regions.
	c.mustSend(ReqSetVringNum, VringState{Index: 0, Num: 256}.Encode())
	good := ringAddr(0, userBase)
	for name, a := range map[string]VringAddr{
		"misaligned descriptors": {DescUser: good.DescUser + 8, AvailUser: good.AvailUser, UsedUser: good.UsedUser},
		"misaligned used ring":   {DescUser: good.DescUser, AvailUser: good.AvailUser, UsedUser: good.UsedUser + 2},
		"descriptors outside":    {DescUser: userBase + 8*ramSize, AvailUser: good.AvailUser, UsedUser: good.UsedUser},
		"used ring straddling":   {DescUser: good.DescUser, AvailUser: good.AvailUser, UsedUser: userBase + half - 64},
		"unknown flag":           {Flags: 2, DescUser: good.DescUser, AvailUser: good.AvailUser, UsedUser: good.UsedUser},
	} {
		if err := c.send(ReqSetVringAddr, a.Encode()); err == nil {
			t.Errorf("%s: SET_VRING_ADDR accepted", name)
		}
	}
	c.mustSend(ReqSetVringAddr, good.Encode())
	c.mustSend(ReqSetVringKick, EncodeU64(0), eventFd(t))
	c.mustSend(ReqSetVringEnable, VringState{Index: 0, Num: 1}.Encode())
	_, ok := dev.runningQueue(0)
	if !ok {
		t.Fatal("ring not running")
	}
	// Guest address 1<<32 is file offset half.
	copy(ram.mem[half+16:], "upper")
	if b, err := dev.guestRange(0, 1<<32+16, 5); err != nil || b != "upper" {
		t.Errorf("Range in second region = %q, %v", b, err)
	}
	if _, err := dev.guestRange(0, half-2, 4); err == nil {
		t.Error("Range into the hole between regions succeeded")
	}
}

func TestAddRemoveMemoryRegions(t *testing.T) {
	dev, _, c := negotiated(t)
	ram := newGuestRAM(t, ramSize)
	low := MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}
	c.mustSend(ReqAddMemReg, EncodeSingleRegion(low), ram.file)
	c.startRing(t, 0, 128)
	if dev.numRunning() != 1 {
		t.Fatal("ring not running")
	}

	ram2 := newGuestRAM(t, ramSize)
	high := MemoryRegion{GuestPhysAddr: 1 << 32, Size: ramSize, UserAddr: userBase + 16*ramSize}
	if err := c.send(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 4096, Size: 4096, UserAddr: userBase + 32*ramSize}), ram2.file); err == nil {
		t.Error("overlapping ADD_MEM_REG accepted")
	}
	if err := c.send(ReqAddMemReg, EncodeSingleRegion(high)); err == nil {
		t.Error("ADD_MEM_REG without fd accepted")
	}
	c.mustSend(ReqAddMemReg, EncodeSingleRegion(high), ram2.file)
	// The ring was stopped and restarted with memory that has both regions.
	q, ok := dev.runningQueue(0)
	if !ok {
		t.Fatal("ring not restarted after ADD_MEM_REG")
	}
	copy(ram2.mem[100:], "two")
	if b, err := dev.guestRange(0, 1<<32+100, 3); err != nil || b != "two" {
		t.Errorf("added region: %q, %v", b, err)
	}
	if q.LastAvail != 3+7 {
		t.Errorf("restart from %d, want 10", q.LastAvail)
	}

	if err := c.send(ReqRemMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 32, Size: 4096, UserAddr: high.UserAddr})); err == nil {
		t.Error("REM_MEM_REG of a region that does not exist accepted")
	}
	c.mustSend(ReqRemMemReg, EncodeSingleRegion(high))
	q, ok = dev.runningQueue(0)
	if !ok {
		t.Fatal("ring not restarted after REM_MEM_REG")
	}
	if _, err := dev.guestRange(0, 1<<32+100, 3); err == nil {
		t.Error("removed region still translates")
	}
	// Removing the ring's own region stops it for good (stopped before unmap:
	// the fake device touches the ring at stop).
	c.mustSend(ReqRemMemReg, EncodeSingleRegion(low), ram.file) // a stray fd is tolerated
	if dev.numRunning() != 0 {
		t.Fatal("ring running without memory")
	}
	ev := dev.eventLog()
	if ev[len(ev)-1] != "stop 0" {
		t.Errorf("last device events %v", ev)
	}
}

func TestSetMemTableWhileRunning(t *testing.T) {
	dev, _, c := negotiated(t)
	setupMem(t, c)
	for i := 0; i < 2; i++ {
		c.startRing(t, i, 128)
	}
	if dev.numRunning() != 2 {
		t.Fatal("rings not running")
	}
	ram := newGuestRAM(t, 2*ramSize)
	copy(ram.mem[ramSize+5:], "new")
	c.mustSend(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: 2 * ramSize, UserAddr: userBase}}), ram.file)
	ev := strings.Join(dev.eventLog(), ",")
	if !strings.HasSuffix(ev, "stop 0,stop 1,start 0,start 1") {
		t.Errorf("device events %s: want both rings stopped, then started", ev)
	}

	if b, err := dev.guestRange(1, ramSize+5, 3); err != nil || b != "new" {
		t.Errorf("new table: %q, %v", b, err)
	}
}

func TestResetDevice(t *testing.T) {
	dev, _, c := negotiated(t)
	setupMem(t, c)
	c.startRing(t, 0, 128)
	c.mustSend(ReqResetDevice, nil)
	if dev.numRunning() != 0 {
		t.Fatal("ring running after RESET_DEVICE")
	}
	// After a reset the ring needs its whole set-up again.
	c.mustSend(ReqSetVringKick, EncodeU64(0), eventFd(t))
	c.mustSend(ReqSetVringEnable, VringState{Index: 0, Num: 1}.Encode())
	if dev.numRunning() != 0 {
		t.Fatal("ring started without size and addresses after reset")
	}
	c.mustSend(ReqSetFeatures, EncodeU64(dev.features|1<<FeatureProtocolFeatures))
	c.startRing(t, 0, 128)
	if dev.numRunning() != 1 {
		t.Fatal("ring not running after set-up following reset")
	}
	c.mustSend(ReqResetOwner, nil)
	if dev.numRunning() != 0 {
		t.Fatal("ring running after RESET_OWNER")
	}
}

func TestMalformedMessages(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	ram := newGuestRAM(t, ramSize)

	// Each of these closes the connection (no REPLY_ACK to report with) or
	// is refused; the server carries on with the next front-end.
	closing := []struct {
		name  string
		send  func(c *client)
		acked bool // negotiate REPLY_ACK first and expect a failure ack
	}{
		{"unknown request", func(c *client) { c.write(Request(200), 0, nil) }, false},
		{"unsupported log request", func(c *client) { c.write(ReqSetLogBase, 0, make([]byte, 16)) }, false},
		{"reply flag from front-end", func(c *client) { c.write(ReqGetFeatures, FlagReply, nil) }, false},
		{"GET_VRING_BASE bad index", func(c *client) { c.write(ReqGetVringBase, 0, VringState{Index: 9}.Encode()) }, false},
		{"GET_VRING_BASE short", func(c *client) { c.write(ReqGetVringBase, 0, []byte{0}) }, false},
		{"GET_FEATURES with payload", func(c *client) { c.write(ReqGetFeatures, 0, []byte{1, 2, 3}) }, false},
	}
	for _, tc := range closing {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, ts.path)
			tc.send(c)
			c.expectClosed()
		})
	}
	acked := []struct {
		name    string
		req     Request
		payload []byte
		files   []*os.File
	}{
		{"short SET_FEATURES", ReqSetFeatures, []byte{1, 2}, nil},
		{"long SET_VRING_NUM", ReqSetVringNum, make([]byte, 12), nil},
		{"short SET_MEM_TABLE", ReqSetMemTable, []byte{1, 0, 0, 0, 0, 0, 0, 0}, []*os.File{ram.file}},
		{"SET_MEM_TABLE 9 regions", ReqSetMemTable, EncodeMemTable(make([]MemoryRegion, 9)), nil},
		{"SET_OWNER with fd", ReqSetOwner, nil, []*os.File{ram.file}},
		{"SET_VRING_KICK no fd", ReqSetVringKick, EncodeU64(0), nil},
		{"SET_VRING_KICK fd with no-fd flag", ReqSetVringKick, EncodeU64(VringNoFd), []*os.File{ram.file}},
		{"SET_VRING_CALL bad index", ReqSetVringCall, EncodeU64(5), []*os.File{ram.file}},
		{"SET_VRING_ERR unknown bits", ReqSetVringErr, EncodeU64(1 << 20), []*os.File{ram.file}},
		{"ADD_MEM_REG two fds", ReqAddMemReg, EncodeSingleRegion(MemoryRegion{Size: 4096}), []*os.File{ram.file, ram.file}},
		{"REM_MEM_REG two fds", ReqRemMemReg, EncodeSingleRegion(MemoryRegion{Size: 4096}), []*os.File{ram.file, ram.file}},
		{"SET_BACKEND_REQ_FD without fd", ReqSetBackendReqFd, nil, nil},
		{"SET_BACKEND_REQ_FD not a socket", ReqSetBackendReqFd, nil, []*os.File{ram.file}},
		{"GET_CONFIG size mismatch", ReqSetConfig, []byte{0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1}, nil},
		{"SET_CONFIG too large", ReqSetConfig, ConfigSpace{Data: make([]byte, 300)}.Encode(), nil},
		{"SET_VRING_ADDR short", ReqSetVringAddr, make([]byte, 20), nil},
	}
	c := dial(t, ts.path)
	c.negotiate(dev, true)
	for _, tc := range acked {
		if err := c.send(tc.req, tc.payload, tc.files...); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	// The session is intact: a ring can still be set up.
	setupMem(t, c)
	c.startRing(t, 0, 128)
	if dev.numRunning() != 1 {
		t.Fatal("ring not running after malformed messages")
	}
	ts.log.WaitContains(t, "protocol error; closing connection")
	ts.log.WaitContains(t, "request failed")
}

func TestOversizedFrames(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	// A header announcing more than MaxPayload.
	uc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ts.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	hdr := make([]byte, HeaderSize)
	Header{Request: ReqSetMemTable, Flags: FlagVersion, Size: 1 << 20}.encode(hdr)
	uc.Write(hdr)
	uc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := uc.Read(make([]byte, 1)); err == nil {
		t.Fatalf("connection open after oversized header (%d bytes read)", n)
	}
	// Wrong protocol version.
	uc2, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ts.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer uc2.Close()
	Header{Request: ReqGetFeatures, Flags: 2}.encode(hdr)
	uc2.Write(hdr)
	uc2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := uc2.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection open after bad version")
	}
	// Too many descriptors in one message.
	uc3, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ts.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer uc3.Close()
	fds := make([]int, MaxFds+2)
	for i := range fds {
		fds[i] = int(eventFd(t).Fd())
	}
	Header{Request: ReqSetOwner, Flags: FlagVersion}.encode(hdr)
	if _, _, err := uc3.WriteMsgUnix(hdr, unix.UnixRights(fds...), nil); err != nil {
		t.Fatal(err)
	}
	uc3.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := uc3.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection open after too many descriptors")
	}
}

// A live migration on one host connects a second front-end (the
// destination's QEMU) to the socket while the first is served: it is
// served too, each with its own memory table, but only one runs rings at a
// time. A third connection is refused.
func TestTwoFrontEnds(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	src := dial(t, ts.path)
	src.negotiate(dev, true)
	srcRAM := setupMem(t, src)
	src.startRing(t, 0, 128)
	if _, ok := dev.runningQueue(0); !ok {
		t.Fatal("source ring not running")
	}

	// The destination connects and reads the config while the source runs.
	dst := dial(t, ts.path)
	dst.negotiate(dev, true)
	ts.log.WaitContains(t, "while another is served")
	dst.write(ReqGetConfig, 0, ConfigSpace{Data: make([]byte, 8)}.Encode())
	if m := dst.read(ReqGetConfig); len(m.Payload) != 12+8 {
		t.Fatalf("destination's GET_CONFIG answered %d bytes", len(m.Payload))
	}
	third := dial(t, ts.path)
	third.expectClosed()
	ts.log.WaitContains(t, "refused a third front-end connection")

	// Its rings may not start while the source's run.
	dstRAM := setupMem(t, dst)
	dst.startRing(t, 0, 128)
	ts.log.WaitContains(t, "another front-end runs this device's rings")
	// Which memory a running ring uses shows in a byte of its used ring.
	srcRAM.mem[ringOff(0)+0x8000+100] = 0xaa
	dstRAM.mem[ringOff(0)+0x8000+100] = 0xbb
	usedMark := func() byte {
		q, ok := dev.runningQueue(0)
		if !ok {
			return 0
		}
		return q.Used[100]
	}
	if m := usedMark(); m != 0xaa {
		t.Fatalf("the running ring is not the source's (mark %#x)", m)
	}

	// The source stops (GET_VRING_BASE, as at the end of a migration);
	// then the destination's ring starts, in the destination's memory.
	src.write(ReqGetVringBase, 0, VringState{Index: 0}.Encode())
	src.read(ReqGetVringBase)
	dst.mustSend(ReqSetVringKick, EncodeU64(0), eventFd(t))
	if m := usedMark(); m != 0xbb {
		t.Fatalf("destination ring not running in its own memory (mark %#x)", m)
	}
	// Now the source may not restart its ring, and its going away leaves
	// the destination's running.
	src.mustSend(ReqSetVringKick, EncodeU64(0), eventFd(t))
	src.conn.Close()
	ts.log.WaitContains(t, "front-end disconnected")
	if m := usedMark(); m != 0xbb {
		t.Fatalf("destination ring stopped when the source went away (mark %#x)", m)
	}
	// A new connection is accepted again (one slot is free).
	next := dial(t, ts.path)
	next.getU64(ReqGetFeatures)
	if got := dst.getU64(ReqGetQueueNum); got != 2 {
		t.Fatalf("destination connection broken: %d", got)
	}
}

func TestReconnect(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	for round := 0; round < 3; round++ {
		c := dial(t, ts.path)
		c.negotiate(dev, true)
		setupMem(t, c)
		sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		theirs := os.NewFile(uintptr(sp[1]), "backend")
		c.mustSend(ReqSetBackendReqFd, nil, theirs)
		theirs.Close()
		unix.Close(sp[0])
		c.setupRing(t, 0, 128)
		c.setupRing(t, 1, 128)
		c.mustSend(ReqSetVringEnable, VringState{Index: 0, Num: 1}.Encode())
		c.mustSend(ReqSetVringEnable, VringState{Index: 1, Num: 1}.Encode())
		if dev.numRunning() != 2 {
			t.Fatalf("round %d: rings not running", round)
		}
		c.conn.Close()
		// Disconnect stops the rings and withdraws the notifier.
		testenv.WaitFor(t, "rings stopped after disconnect", func() bool { return dev.numRunning() == 0 && dev.notifier() == nil })
	}
	ts.log.WaitContains(t, "front-end disconnected")
}

// A front-end that reconnects at once (QEMU after a back-end restart, or
// after its own socket error) may set its rings up while the server still
// tears the old session down: the old session's socket is closed, but its
// rings wait for the requests they serve. The new session's rings must
// start once the old ones have stopped, not be refused as if a second
// front-end (a migration's other end) wanted them.
func TestReconnectWhileOldSessionStops(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	old := dial(t, ts.path)
	old.negotiate(dev, true)
	setupMem(t, old)
	for i := range 2 {
		old.startRing(t, i, 128)
	}
	if dev.numRunning() != 2 {
		t.Fatal("rings not running")
	}
	gate := make(chan struct{})
	dev.mu.Lock()
	dev.stopGate = gate
	dev.mu.Unlock()
	old.conn.Close()
	ts.log.WaitContains(t, "front-end disconnected")

	next := dial(t, ts.path)
	next.negotiate(dev, true)
	ram := setupMem(t, next)
	for i := range 2 {
		ram.mem[ringOff(i)+0x8000+100] = 0xcc
	}
	// The old rings' requests finish a little later.
	release := time.AfterFunc(300*time.Millisecond, func() { close(gate) })
	defer release.Stop()
	for i := range 2 {
		next.startRing(t, i, 128)
	}
	testenv.WaitFor(t, "the new connection's rings running", func() bool {
		for i := range 2 {
			q, ok := dev.runningQueue(i)
			if !ok || q.Used[100] != 0xcc {
				return false
			}
		}
		return true
	})
	if strings.Contains(ts.log.String(), "another front-end runs this device's rings") {
		t.Error("the reconnected front-end's rings were refused as a second front-end's")
	}
}

func TestConfigChangeNotifier(t *testing.T) {
	dev, _, c := negotiated(t)
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(sp[1]), "backend-theirs")
	ours, err := net.FileConn(os.NewFile(uintptr(sp[0]), "backend-ours"))
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	bc := NewConn(ours.(*net.UnixConn))
	c.mustSend(ReqSetBackendReqFd, nil, theirs)
	theirs.Close()
	notify := dev.notifier()
	if notify == nil {
		t.Fatal("no notifier handed to the device")
	}
	// The front-end acknowledges the notification, as QEMU does.
	res := make(chan error, 1)
	go func() { res <- notify() }()
	m, err := bc.Read()
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.Request != Request(BackendConfigChange) || !m.Header.NeedReply() {
		t.Fatalf("got %v flags %#x", m.Header.Request, m.Header.Flags)
	}
	if err := bc.Write(Header{Request: m.Header.Request, Flags: FlagReply}, EncodeU64(0)); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatalf("notify: %v", err)
	}
	// A failure status comes back as an error.
	go func() { res <- notify() }()
	if m, err = bc.Read(); err != nil {
		t.Fatal(err)
	}
	bc.Write(Header{Request: m.Header.Request, Flags: FlagReply}, EncodeU64(1))
	if err := <-res; err == nil {
		t.Fatal("notify succeeded although the front-end reported failure")
	}
	// After the front-end is gone the notifier fails instead of hanging.
	c.conn.Close()
	testenv.WaitFor(t, "notifier withdrawn", func() bool { return dev.notifier() == nil })
	if err := notify(); err == nil {
		t.Fatal("notify succeeded after disconnect")
	}
}

func TestStaleAndLiveSockets(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	// A stale socket: bound, then its listener gone without unlinking.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	srv, err := Listen(ServerOptions{SocketPath: path}, newFakeDevice())
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	// A live socket is left alone.
	if _, err := Listen(ServerOptions{SocketPath: path}, newFakeDevice()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Listen on a live socket: %v", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("live socket removed: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Close left the socket: %v", err)
	}
	// Not a socket: refused, untouched.
	if err := os.WriteFile(path, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(ServerOptions{SocketPath: path}, newFakeDevice()); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(path); string(b) != "data" {
		t.Fatal("regular file changed")
	}
	// A custom mode.
	path2 := filepath.Join(dir, "m.sock")
	srv2, err := Listen(ServerOptions{SocketPath: path2, SocketMode: 0o660}, newFakeDevice())
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Close()
	if fi, err := os.Stat(path2); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, %v; want 0660", fi.Mode().Perm(), err)
	}
	if matches, _ := filepath.Glob(filepath.Join(dir, ".vhu*")); len(matches) != 0 {
		t.Errorf("temporary socket names left: %v", matches)
	}
}

func TestCloseStopsEverything(t *testing.T) {
	dev, ts, c := negotiated(t)
	setupMem(t, c)
	c.startRing(t, 0, 128)
	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if dev.numRunning() != 0 {
		t.Fatal("ring running after Close")
	}
	if _, err := os.Stat(ts.path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket still there after Close: %v", err)
	}
	c.expectClosed()
	select {
	case err := <-ts.done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
		ts.done <- nil // for the cleanup
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
	if _, err := net.Dial("unix", ts.path); err == nil {
		t.Fatal("still accepting after Close")
	}
}

func TestServeStopsWithContext(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.sock")
	srv, err := Listen(ServerOptions{SocketPath: path}, newFakeDevice())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	c := dial(t, path)
	c.getU64(ReqGetFeatures)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve ignored context cancellation")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left: %v", err)
	}
}

func TestConcurrentListenInOneDirectory(t *testing.T) {
	dir := t.TempDir()
	const n = 8
	errs := make(chan error, n)
	srvs := make(chan *Server, n)
	for i := 0; i < n; i++ {
		go func(i int) {
			srv, err := Listen(ServerOptions{SocketPath: filepath.Join(dir, fmt.Sprintf("v%d.sock", i))}, newFakeDevice())
			errs <- err
			srvs <- srv
		}(i)
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
		if srv := <-srvs; srv != nil {
			defer srv.Close()
		}
	}
}

// A socket path that fits sockaddr_un but leaves no room for the
// temporary name is bound in place, with the same mode.
func TestListenLongPath(t *testing.T) {
	dir := t.TempDir()
	name := strings.Repeat("x", 100-len(dir)-1) + ".s"
	path := filepath.Join(dir, name)
	if len(path) >= 108 {
		t.Fatalf("temporary directory %s too long for this test", dir)
	}
	srv, err := Listen(ServerOptions{SocketPath: path, SocketMode: 0o640}, newFakeDevice())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o640 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket %v, %v", fi, err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

// openFds counts this process's open descriptors.
func openFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// mappings counts this process's memory mappings of memfd "guest-ram".
func guestMappings(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "memfd:guest-ram")
}

// After a front-end goes away, every descriptor it sent is closed and
// every region it shared is unmapped.
func TestDisconnectReleasesEverything(t *testing.T) {
	dev := newFakeDevice()
	ts := startServer(t, dev)
	fds0, maps0 := openFds(t), guestMappings(t)
	func() {
		c := dial(t, ts.path)
		defer c.conn.Close()
		c.negotiate(dev, true)
		ram := newGuestRAM(t, ramSize)
		c.mustSend(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}}), ram.file)
		ram2 := newGuestRAM(t, ramSize)
		c.mustSend(ReqAddMemReg, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 32, Size: ramSize, UserAddr: userBase + 8*ramSize}), ram2.file)
		sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		theirs := os.NewFile(uintptr(sp[1]), "backend")
		c.mustSend(ReqSetBackendReqFd, nil, theirs)
		theirs.Close()
		defer unix.Close(sp[0])
		for i := 0; i < 2; i++ {
			c.setupRing(t, i, 128)
			c.mustSend(ReqSetVringErr, EncodeU64(uint64(i)), eventFd(t))
			c.mustSend(ReqSetVringEnable, VringState{Index: uint32(i), Num: 1}.Encode())
		}
		if dev.numRunning() != 2 {
			t.Fatal("rings not running")
		}
		// The server holds: 2 kick, 2 call, 2 err fds and the back-end channel.
		if got := openFds(t) - fds0; got < 7 {
			t.Fatalf("only %d more descriptors open while serving", got)
		}
		if got := guestMappings(t) - maps0; got < 4 {
			t.Fatalf("only %d more guest mappings while serving", got)
		}
	}()
	// The test's own memfds, eventfds and mappings are released by its
	// cleanups at the end; count only what the server held.
	// A second front-end may connect while the first is served (a
	// migration), so the next one is served even before the release:
	// wait for it.
	next := waitServed(t, ts.path)
	defer next.Close()
	ts.log.WaitContains(t, "front-end disconnected")
	// Left: the test's 2 mappings and 6 eventfds + 2 memfds, and both
	// ends of the new connection.
	deadline := time.Now().Add(5 * time.Second)
	for guestMappings(t)-maps0 != 2 || openFds(t)-fds0 != 6+2+2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d more guest mappings and %d more descriptors after disconnect, want 2 and %d (the test's own)",
				guestMappings(t)-maps0, openFds(t)-fds0, 6+2+2)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitServed connects until the server serves the connection (it refuses
// new ones while it still tears down the previous one).
func waitServed(t *testing.T, path string) *Conn {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		uc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		uc.SetDeadline(time.Now().Add(5 * time.Second))
		c := NewConn(uc)
		if err := c.Write(Header{Request: ReqGetQueueNum}, nil); err == nil {
			if m, err := c.Read(); err == nil && m.Header.IsReply() {
				return c
			}
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("server never served a new connection")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// signalsTo reports whether a signal on e reaches f: the same eventfd
// (eventfds share one inode, so a stat cannot tell).
func signalsTo(t *testing.T, e *eventfd.FD, f *os.File) bool {
	t.Helper()
	if err := e.Signal(); err != nil {
		t.Fatal(err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	var rerr error
	if err := rc.Control(func(fd uintptr) {
		var b [8]byte
		_, rerr = unix.Read(int(fd), b[:])
		n = binary.LittleEndian.Uint64(b[:])
	}); err != nil {
		t.Fatal(err)
	}
	return rerr == nil && n == 1
}

// A ring the device fails to stop may still be using guest memory: the
// session closes the connection and leaves the memory mapped rather than
// change the memory table under it.
func TestStopFailureClosesWithoutUnmapping(t *testing.T) {
	for _, tc := range []struct {
		name string
		fail func(c *client)
	}{
		{"SET_MEM_TABLE", func(c *client) {
			ram := newGuestRAM(c.t, 2*ramSize)
			c.write(ReqSetMemTable, FlagNeedReply, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: 2 * ramSize, UserAddr: userBase}}), ram.file)
		}},
		{"REM_MEM_REG", func(c *client) {
			c.write(ReqRemMemReg, FlagNeedReply, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 0, Size: ramSize, UserAddr: userBase}))
		}},
		{"GET_VRING_BASE", func(c *client) {
			c.write(ReqGetVringBase, 0, VringState{Index: 0}.Encode())
		}},
		{"SET_VRING_ENABLE 0", func(c *client) {
			c.write(ReqSetVringEnable, FlagNeedReply, VringState{Index: 0, Num: 0}.Encode())
		}},
		{"disconnect", func(c *client) { c.conn.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newFakeDevice()
			ts := startServer(t, dev)
			maps0 := guestMappings(t)
			c := dial(t, ts.path)
			c.negotiate(dev, true)
			setupMem(t, c)
			c.startRing(t, 0, 128)
			dev.mu.Lock()
			dev.stopErr = errors.New("requests still in flight")
			dev.mu.Unlock()
			tc.fail(c)
			if tc.name != "disconnect" {
				c.expectClosed()
			}
			ts.log.WaitContains(t, "a ring did not stop")
			// The running queue still reads its ring: memory must be mapped
			// (the test's own mapping plus the server's).
			if got := guestMappings(t) - maps0; got < 2 {
				t.Fatalf("%d guest mappings left: the server unmapped memory under a running ring", got)
			}
			if _, err := dev.guestRange(0, 0x1000, 8); err != nil {
				t.Fatal(err)
			}
			dev.mu.Lock()
			touch(dev.running[0].Used)
			dev.stopErr = nil
			dev.mu.Unlock()
		})
	}
}

// Messages that belong to a protocol feature are refused unless that
// feature was negotiated (as rust-vmm's check_proto_feature does).
func TestProtocolFeatureRequired(t *testing.T) {
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sp[0])
	backendFd := os.NewFile(uintptr(sp[1]), "backend")
	defer backendFd.Close()
	for _, tc := range []struct {
		req     Request
		bit     int
		payload []byte
		files   []*os.File
		reply   bool // a request with a reply of its own: refused by closing
	}{
		{ReqResetDevice, ProtoResetDevice, nil, nil, false},
		{ReqGetMaxMemSlots, ProtoConfigureMemSlots, nil, nil, true},
		{ReqRemMemReg, ProtoConfigureMemSlots, EncodeSingleRegion(MemoryRegion{Size: ramSize, UserAddr: userBase}), nil, false},
		{ReqGetConfig, ProtoConfig, ConfigSpace{Data: make([]byte, 8)}.Encode(), nil, true},
		{ReqSetConfig, ProtoConfig, ConfigSpace{Offset: 20, Data: []byte{1}}.Encode(), nil, false},
		{ReqSetBackendReqFd, ProtoBackendReq, nil, []*os.File{backendFd}, false},
		{ReqSetStatus, ProtoStatus, EncodeU64(1), nil, false},
		{ReqGetStatus, ProtoStatus, nil, nil, true},
	} {
		t.Run(tc.req.String(), func(t *testing.T) {
			dev := newFakeDevice()
			ts := startServer(t, dev)
			c := dial(t, ts.path)
			c.getU64(ReqGetFeatures)
			// Everything offered but the feature under test.
			c.mustSend(ReqSetProtocolFeatures, EncodeU64(OfferedProtocolFeatures&^(1<<tc.bit)))
			c.ack = true
			c.mustSend(ReqSetFeatures, EncodeU64(dev.features|1<<FeatureProtocolFeatures))
			setupMem(t, c)
			switch {
			case tc.req == ReqGetConfig:
				// QEMU reads an empty reply as a failed read.
				c.write(tc.req, 0, tc.payload, tc.files...)
				if m := c.read(tc.req); len(m.Payload) != 0 {
					t.Fatalf("GET_CONFIG answered %d bytes without CONFIG", len(m.Payload))
				}
			case tc.reply:
				c.write(tc.req, 0, tc.payload, tc.files...)
				c.expectClosed()
			default:
				if err := c.send(tc.req, tc.payload, tc.files...); err == nil {
					t.Fatalf("%v accepted without its protocol feature", tc.req)
				}
			}
			ts.log.WaitContains(t, "was not negotiated")
		})
	}
}
