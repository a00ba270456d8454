// Package frontend is a vhost-user-blk front-end driver: it does, from a Go
// process, what QEMU does for a guest. It connects to a back-end's unix
// socket, negotiates features, shares "guest memory" (a memfd that it also
// maps itself: guest-physical addresses 0..MemSize, user address = its own
// mapping), sets up split virtqueues with kick and call eventfds, and
// submits virtio-blk requests.
//
// It serves integration tests (the same requests against thinblk and
// qemu-storage-daemon, including malformed ones) and the host-side
// benchmark.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"time"

	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
)

// Options configure Dial. Zero values pick the defaults.
type Options struct {
	NumQueues int    // queues to set up (default 1)
	QueueSize uint16 // descriptors per queue, a power of two (default 128)
	MemSize   uint64 // bytes of guest memory (default 64 MiB)
	// DisableFeatures are virtio feature bits the driver must not accept
	// even if offered (e.g. 1<<virtio.FeatureEventIdx).
	DisableFeatures uint64
	// DisableProtocolFeatures likewise for vhost-user protocol features.
	DisableProtocolFeatures uint64
	// Timeout bounds each control-message round trip and each synchronous
	// request (default 10 s): a hung back-end fails, never hangs.
	Timeout time.Duration
	// Indirect makes the synchronous calls send indirect descriptors (if
	// negotiated); requests built by hand choose with Req.Indirect.
	Indirect bool
	// ConfigChanges opens the back-end request channel (BACKEND_REQ,
	// SET_BACKEND_REQ_FD) so that the back-end can announce config
	// changes such as a new capacity; see Disk.ConfigChanged.
	ConfigChanges bool
}

// driverFeatures are the virtio feature bits this driver understands.
const driverFeatures = 1<<virtio.FeatureVersion1 | 1<<virtio.FeatureEventIdx |
	1<<virtio.FeatureIndirectDesc | 1<<vhostuser.FeatureProtocolFeatures |
	1<<blk.FeatureSizeMax | 1<<blk.FeatureSegMax | 1<<blk.FeatureGeometry |
	1<<blk.FeatureRO | 1<<blk.FeatureBlkSize | 1<<blk.FeatureFlush |
	1<<blk.FeatureTopology | 1<<blk.FeatureConfigWCE | 1<<blk.FeatureMQ |
	1<<blk.FeatureDiscard | 1<<blk.FeatureWriteZeroes

// driverProtocolFeatures are the protocol features it uses.
const driverProtocolFeatures = 1<<vhostuser.ProtoMQ | 1<<vhostuser.ProtoReplyAck |
	1<<vhostuser.ProtoConfig | 1<<vhostuser.ProtoLogShmfd | 1<<vhostuser.ProtoInflightShmfd

// Disk is a connected vhost-user-blk device.
type Disk struct {
	opts     Options
	uc       *net.UnixConn
	conn     *vhostuser.Conn
	mem      *Memory
	queues   []*Queue
	indirect bool

	offered, features           uint64
	offeredProto, protoFeatures uint64
	maxQueues                   int
	rawConfig                   []byte
	config                      Config

	rr     atomic.Uint32
	closed bool

	// The in-flight area (INFLIGHT_SHMFD) the back-end handed out: kept,
	// like QEMU keeps it, across reconnections to restarted back-ends.
	inflightFile *os.File
	inflight     vhostuser.Inflight
	reconnects   int

	// ctrl serializes control-channel exchanges (RefreshConfig may run
	// while a config-change notification is handled).
	ctrl          sync.Mutex
	backendConn   *vhostuser.Conn
	backendDone   chan struct{}
	configChanged chan struct{}

	dirtyLog *DirtyLog // StartDirtyLog's, unmapped at Close
}

// Dial connects to the back-end at socketPath and sets up the device. The
// context bounds the connection set-up.
func Dial(ctx context.Context, socketPath string, opts Options) (*Disk, error) {
	if opts.NumQueues == 0 {
		opts.NumQueues = 1
	}
	if opts.QueueSize == 0 {
		opts.QueueSize = 128
	}
	if opts.MemSize == 0 {
		opts.MemSize = 64 << 20
	}
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Second
	}
	var dialer net.Dialer
	c, err := dialer.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("connect to vhost-user back-end: %w", err)
	}
	d := &Disk{opts: opts, uc: c.(*net.UnixConn)}
	d.conn = vhostuser.NewConn(d.uc)
	ok := false
	defer func() {
		if !ok {
			d.teardown()
		}
	}()
	if dl, ok := ctx.Deadline(); ok {
		d.uc.SetDeadline(dl)
	}
	if d.mem, err = newMemory(opts.MemSize); err != nil {
		return nil, err
	}
	if err = d.negotiate(); err != nil {
		return nil, fmt.Errorf("vhost-user negotiation with %s: %w", socketPath, err)
	}
	if err = d.setupQueues(); err != nil {
		return nil, fmt.Errorf("vhost-user queue set-up with %s: %w", socketPath, err)
	}
	d.uc.SetDeadline(time.Time{})
	ok = true
	return d, nil
}

func (d *Disk) negotiate() error {
	var err error
	if d.offered, err = d.getU64(vhostuser.ReqGetFeatures); err != nil {
		return err
	}
	if d.offered&(1<<virtio.FeatureVersion1) == 0 {
		return fmt.Errorf("back-end features %#x lack VERSION_1", d.offered)
	}
	d.features = d.offered & driverFeatures &^ d.opts.DisableFeatures
	if d.features&(1<<vhostuser.FeatureProtocolFeatures) != 0 {
		if d.offeredProto, err = d.getU64(vhostuser.ReqGetProtocolFeatures); err != nil {
			return err
		}
		mine := uint64(driverProtocolFeatures)
		if d.opts.ConfigChanges {
			mine |= 1 << vhostuser.ProtoBackendReq
		}
		want := d.offeredProto & mine &^ d.opts.DisableProtocolFeatures
		// REPLY_ACK takes effect for the messages after this one.
		if err = d.send(vhostuser.ReqSetProtocolFeatures, vhostuser.EncodeU64(want)); err != nil {
			return err
		}
		d.protoFeatures = want
	}
	d.maxQueues = 1
	if d.protoFeatures&(1<<vhostuser.ProtoMQ) != 0 {
		n, err := d.getU64(vhostuser.ReqGetQueueNum)
		if err != nil {
			return err
		}
		if n == 0 || n > 1024 {
			return fmt.Errorf("back-end reports %d queues", n)
		}
		d.maxQueues = int(n)
	}
	if d.opts.NumQueues < 1 || d.opts.NumQueues > d.maxQueues {
		return fmt.Errorf("%d queues requested, back-end offers %d", d.opts.NumQueues, d.maxQueues)
	}
	if err = d.send(vhostuser.ReqSetOwner, nil); err != nil {
		return err
	}
	if d.opts.ConfigChanges {
		if d.protoFeatures&(1<<vhostuser.ProtoBackendReq) == 0 {
			return fmt.Errorf("config-change notifications asked for, but the back-end does not offer BACKEND_REQ (protocol features %#x)", d.offeredProto)
		}
		if err = d.openBackendChannel(); err != nil {
			return err
		}
	}
	if err = d.send(vhostuser.ReqSetFeatures, vhostuser.EncodeU64(d.features)); err != nil {
		return err
	}
	d.indirect = d.features&(1<<virtio.FeatureIndirectDesc) != 0
	if d.protoFeatures&(1<<vhostuser.ProtoConfig) == 0 {
		return fmt.Errorf("back-end does not offer the CONFIG protocol feature (protocol features %#x)", d.offeredProto)
	}
	if err = d.readConfig(); err != nil {
		return err
	}
	if err = d.setInflight(); err != nil {
		return err
	}
	regions := []vhostuser.MemoryRegion{{GuestPhysAddr: 0, Size: d.mem.Size(), UserAddr: d.mem.Base(), MmapOffset: 0}}
	return d.send(vhostuser.ReqSetMemTable, vhostuser.EncodeMemTable(regions), d.mem.file)
}

func (d *Disk) readConfig() error {
	req := vhostuser.ConfigSpace{Data: make([]byte, blk.ConfigSize)}
	msg, err := d.call(vhostuser.ReqGetConfig, req.Encode())
	if err != nil {
		return err
	}
	cs, err := vhostuser.DecodeConfigSpace(msg.Payload)
	if err != nil {
		return fmt.Errorf("GET_CONFIG reply: %w", err)
	}
	if len(cs.Data) < blk.ConfigSize {
		return fmt.Errorf("GET_CONFIG reply: %d bytes of config, want %d", len(cs.Data), blk.ConfigSize)
	}
	d.ctrl.Lock()
	d.rawConfig = append([]byte(nil), cs.Data...)
	d.config = decodeConfig(d.rawConfig)
	d.ctrl.Unlock()
	return nil
}

// setInflight hands the back-end the in-flight area, asking it for one
// first if this driver has none yet (as QEMU does when a device starts).
func (d *Disk) setInflight() error {
	if d.protoFeatures&(1<<vhostuser.ProtoInflightShmfd) == 0 {
		return nil
	}
	if d.inflightFile == nil {
		req := vhostuser.Inflight{NumQueues: uint16(d.opts.NumQueues), QueueSize: d.opts.QueueSize}
		msg, err := d.callFiles(vhostuser.ReqGetInflightFd, req.Encode())
		if err != nil {
			return err
		}
		in, err := vhostuser.DecodeInflight(msg.Payload)
		if err != nil || len(msg.Files) != 1 || in.MmapSize == 0 {
			msg.CloseFiles()
			return fmt.Errorf("GET_INFLIGHT_FD reply: %v, %d descriptors, %d bytes", err, len(msg.Files), in.MmapSize)
		}
		d.inflightFile, msg.Files[0] = msg.Files[0], nil
		in.NumQueues, in.QueueSize = req.NumQueues, req.QueueSize
		d.inflight = in
	}
	return d.send(vhostuser.ReqSetInflightFd, d.inflight.Encode(), d.inflightFile)
}

// Inflight reports the in-flight area this driver keeps for the back-end
// (zero without INFLIGHT_SHMFD).
func (d *Disk) Inflight() vhostuser.Inflight { return d.inflight }

func (d *Disk) setupQueues() error {
	eventIdx := d.features&(1<<virtio.FeatureEventIdx) != 0
	for i := 0; i < d.opts.NumQueues; i++ {
		r, err := newRing(d.mem, d.opts.QueueSize, eventIdx)
		if err != nil {
			return err
		}
		q := &Queue{d: d, index: i, ring: r, inflight: make([]*Req, r.size), scratch: make([]desc, 0, 64)}
		q.one[0] = 1
		d.queues = append(d.queues, q)
		if q.kick, err = newEventfd(); err != nil {
			return err
		}
		// Fd leaves the mode alone: NewFile saw the descriptor was
		// already non-blocking, so the back-end's view is unchanged.
		q.kickFd = int(q.kick.Fd())
		if q.call, err = newEventfd(); err != nil {
			return err
		}
	}
	return d.startRings()
}

// startRings sends each ring's set-up and enables it. A ring resumes at
// its used index, as QEMU resumes one whose back-end went away: with an
// in-flight area the back-end finds the requests taken after it there.
func (d *Disk) startRings() error {
	for i, q := range d.queues {
		r := q.ring
		idx := uint32(i)
		steps := []struct {
			req     vhostuser.Request
			payload []byte
			file    *os.File
		}{
			{vhostuser.ReqSetVringNum, vhostuser.VringState{Index: idx, Num: uint32(r.size)}.Encode(), nil},
			{vhostuser.ReqSetVringBase, vhostuser.VringState{Index: idx, Num: uint32(r.usedIdx())}.Encode(), nil},
			{vhostuser.ReqSetVringAddr, vhostuser.VringAddr{
				Index:     idx,
				DescUser:  d.mem.Base() + r.desc.Addr,
				UsedUser:  d.mem.Base() + r.used.Addr,
				AvailUser: d.mem.Base() + r.avail.Addr,
			}.Encode(), nil},
			{vhostuser.ReqSetVringKick, vhostuser.EncodeU64(uint64(idx)), q.kick},
			{vhostuser.ReqSetVringCall, vhostuser.EncodeU64(uint64(idx)), q.call},
		}
		for _, s := range steps {
			var files []*os.File
			if s.file != nil {
				files = append(files, s.file)
			}
			if err := d.send(s.req, s.payload, files...); err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
		}
	}
	if d.features&(1<<vhostuser.FeatureProtocolFeatures) != 0 {
		// Rings start disabled when PROTOCOL_FEATURES is negotiated.
		for i := range d.queues {
			if err := d.send(vhostuser.ReqSetVringEnable, vhostuser.VringState{Index: uint32(i), Num: 1}.Encode()); err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
		}
	}
	return nil
}

// Reconnect connects to a (restarted) back-end at socketPath and sets the
// device up again as QEMU does after its back-end went away: the same
// features, the in-flight area it kept, the same guest memory and rings,
// each resuming at its used index. Requests in flight stay submitted;
// their completions arrive as usual. The old connection is closed first.
func (d *Disk) Reconnect(ctx context.Context, socketPath string) error {
	if d.closed {
		return errors.New("disk closed")
	}
	d.uc.Close()
	if d.backendConn != nil {
		d.backendConn.Close()
		<-d.backendDone
		d.backendConn = nil
	}
	var dialer net.Dialer
	c, err := dialer.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return fmt.Errorf("reconnect to vhost-user back-end: %w", err)
	}
	d.ctrl.Lock()
	d.uc = c.(*net.UnixConn)
	d.conn = vhostuser.NewConn(d.uc)
	d.ctrl.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		d.uc.SetDeadline(dl)
	}
	features := d.features
	if err := d.negotiate(); err != nil {
		return fmt.Errorf("vhost-user negotiation with %s: %w", socketPath, err)
	}
	if d.features != features {
		return fmt.Errorf("back-end at %s negotiated features %#x, before %#x", socketPath, d.features, features)
	}
	if err := d.startRings(); err != nil {
		return fmt.Errorf("vhost-user queue set-up with %s: %w", socketPath, err)
	}
	d.uc.SetDeadline(time.Time{})
	d.reconnects++
	return nil
}

// openBackendChannel hands the back-end one end of a socket pair for its
// requests and serves them on the other end.
func (d *Disk) openBackendChannel() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("backend request channel: socketpair: %w", err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "backend-req")
	ours := os.NewFile(uintptr(fds[0]), "backend-req")
	c, err := net.FileConn(ours) // dups the descriptor
	ours.Close()
	if err != nil {
		theirs.Close()
		return fmt.Errorf("backend request channel: %w", err)
	}
	d.backendConn = vhostuser.NewConn(c.(*net.UnixConn))
	d.backendDone = make(chan struct{})
	d.configChanged = make(chan struct{}, 1)
	err = d.send(vhostuser.ReqSetBackendReqFd, nil, theirs)
	theirs.Close()
	go d.serveBackendRequests()
	return err
}

// serveBackendRequests answers the back-end's requests until the channel
// closes. A config change is announced on configChanged (coalesced).
func (d *Disk) serveBackendRequests() {
	defer close(d.backendDone)
	for {
		m, err := d.backendConn.Read()
		if err != nil {
			return
		}
		m.CloseFiles()
		result := uint64(0)
		switch vhostuser.BackendRequest(m.Header.Request) {
		case vhostuser.BackendConfigChange:
			select {
			case d.configChanged <- struct{}{}:
			default:
			}
		default:
			result = 1 // not supported
		}
		if m.Header.NeedReply() {
			h := vhostuser.Header{Request: m.Header.Request, Flags: vhostuser.FlagReply}
			if err := d.backendConn.Write(h, vhostuser.EncodeU64(result)); err != nil {
				return
			}
		}
	}
}

// ConfigChanged delivers a value after the back-end announced a config
// change (Options.ConfigChanges); call RefreshConfig to read the new
// config. It is nil without Options.ConfigChanges.
func (d *Disk) ConfigChanged() <-chan struct{} { return d.configChanged }

// deadline bounds one control exchange.
func (d *Disk) deadline() { d.uc.SetDeadline(time.Now().Add(d.opts.Timeout)) }

// send sends a message that has no reply of its own; with REPLY_ACK it
// asks for, and checks, the acknowledgement.
func (d *Disk) send(req vhostuser.Request, payload []byte, files ...*os.File) error {
	d.ctrl.Lock()
	defer d.ctrl.Unlock()
	d.deadline()
	ack := d.protoFeatures&(1<<vhostuser.ProtoReplyAck) != 0
	var flags uint32
	if ack {
		flags = vhostuser.FlagNeedReply
	}
	if err := d.conn.Write(vhostuser.Header{Request: req, Flags: flags}, payload, files...); err != nil {
		return err
	}
	if !ack {
		return nil
	}
	msg, err := d.readReply(req)
	if err != nil {
		return err
	}
	msg.CloseFiles()
	v, err := vhostuser.DecodeU64(msg.Payload)
	if err != nil {
		return fmt.Errorf("%v acknowledgement: %w", req, err)
	}
	if v != 0 {
		return fmt.Errorf("%v: back-end reports failure (%d)", req, v)
	}
	return nil
}

// call sends a request that has a reply and returns the reply.
func (d *Disk) call(req vhostuser.Request, payload []byte) (vhostuser.Message, error) {
	msg, err := d.callFiles(req, payload)
	msg.CloseFiles()
	return msg, err
}

// callFiles is call for replies that carry descriptors (the caller closes
// them).
func (d *Disk) callFiles(req vhostuser.Request, payload []byte) (vhostuser.Message, error) {
	d.ctrl.Lock()
	defer d.ctrl.Unlock()
	d.deadline()
	if err := d.conn.Write(vhostuser.Header{Request: req}, payload); err != nil {
		return vhostuser.Message{}, err
	}
	return d.readReply(req)
}

// readReply reads the reply to req; its descriptors are the caller's.
func (d *Disk) readReply(req vhostuser.Request) (vhostuser.Message, error) {
	msg, err := d.conn.Read()
	if err != nil {
		return msg, fmt.Errorf("read %v reply: %w", req, err)
	}
	if msg.Header.Request != req || !msg.Header.IsReply() {
		msg.CloseFiles()
		return msg, fmt.Errorf("%v: unexpected reply %v (flags %#x)", req, msg.Header.Request, msg.Header.Flags)
	}
	return msg, nil
}

func (d *Disk) getU64(req vhostuser.Request) (uint64, error) {
	msg, err := d.call(req, nil)
	if err != nil {
		return 0, err
	}
	v, err := vhostuser.DecodeU64(msg.Payload)
	if err != nil {
		return 0, fmt.Errorf("%v reply: %w", req, err)
	}
	return v, nil
}

// Queues returns the queues.
func (d *Disk) Queues() []*Queue { return d.queues }

// Queue returns queue i.
func (d *Disk) Queue(i int) *Queue { return d.queues[i] }

// Memory is the guest memory, for buffers of hand-built requests.
func (d *Disk) Memory() *Memory { return d.mem }

// Features are the negotiated virtio feature bits.
func (d *Disk) Features() uint64 { return d.features }

// OfferedFeatures are the feature bits the back-end offered.
func (d *Disk) OfferedFeatures() uint64 { return d.offered }

// ProtocolFeatures are the negotiated protocol feature bits.
func (d *Disk) ProtocolFeatures() uint64 { return d.protoFeatures }

// MaxQueues is the back-end's GET_QUEUE_NUM answer (1 without MQ).
func (d *Disk) MaxQueues() int { return d.maxQueues }

// Has reports whether virtio feature bit was negotiated.
func (d *Disk) Has(bit int) bool { return d.features&(1<<bit) != 0 }

// Config is the virtio-blk config space read at Dial time (or by the
// last RefreshConfig).
func (d *Disk) Config() Config {
	d.ctrl.Lock()
	defer d.ctrl.Unlock()
	return d.config
}

// RawConfig is the config space bytes behind Config.
func (d *Disk) RawConfig() []byte {
	d.ctrl.Lock()
	defer d.ctrl.Unlock()
	return append([]byte(nil), d.rawConfig...)
}

// RefreshConfig reads the config space again (e.g. after a resize) and
// returns it; Config and Capacity report it from then on.
func (d *Disk) RefreshConfig() (Config, error) {
	if err := d.readConfig(); err != nil {
		return Config{}, err
	}
	d.ctrl.Lock()
	defer d.ctrl.Unlock()
	return d.config, nil
}

// Capacity is the disk size in bytes.
func (d *Disk) Capacity() uint64 { return d.Config().Capacity * blk.SectorSize }

// Close stops every ring (GET_VRING_BASE), then closes the connection and
// frees guest memory. Requests still in flight are abandoned.
func (d *Disk) Close() error {
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	for i, q := range d.queues {
		q.mu.Lock()
		msg, err := d.call(vhostuser.ReqGetVringBase, vhostuser.VringState{Index: uint32(i)}.Encode())
		if err == nil {
			_, err = vhostuser.DecodeVringState(msg.Payload)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("queue %d: %w", i, err))
		}
		q.mu.Unlock()
	}
	d.teardown()
	return errors.Join(errs...)
}

// StopQueue sends GET_VRING_BASE for queue i and returns the back-end's
// next available index (what a restart would resume from).
func (d *Disk) StopQueue(i int) (uint16, error) {
	msg, err := d.call(vhostuser.ReqGetVringBase, vhostuser.VringState{Index: uint32(i)}.Encode())
	if err != nil {
		return 0, err
	}
	s, err := vhostuser.DecodeVringState(msg.Payload)
	return uint16(s.Num), err
}

func (d *Disk) teardown() {
	d.uc.Close()
	if d.backendConn != nil {
		d.backendConn.Close()
		<-d.backendDone
	}
	for _, q := range d.queues {
		if q.kick != nil {
			q.kick.Close()
		}
		if q.call != nil {
			q.call.Close()
		}
	}
	if d.mem != nil {
		d.mem.close()
	}
	if d.dirtyLog != nil {
		d.dirtyLog.close()
	}
	if d.inflightFile != nil {
		d.inflightFile.Close()
	}
}
