package thin

// Status: a consistent picture of the pool's space, for `status --json`
// and the metrics.

import (
	"path/filepath"
	"sort"
	"time"

	"github.com/thinblk/thinblk/pebblemeta"
)

// PoolStatus is the pool part of Status. Byte counts always satisfy
// allocated + reserved + free = size.
type PoolStatus struct {
	Dir            string `json:"dir"`
	SizeBytes      uint64 `json:"size_bytes"`
	AllocatedBytes uint64 `json:"allocated_bytes"`
	ReservedBytes  uint64 `json:"reserved_bytes"`
	FreeBytes      uint64 `json:"free_bytes"`
	// ReleasingBytes are discarded blocks, counted in allocated, that
	// become free at the next metadata commit.
	ReleasingBytes  uint64  `json:"releasing_bytes"`
	BlockSize       uint32  `json:"block_size"`
	NoSpace         string  `json:"no_space"`
	NoSpaceTimeoutS float64 `json:"no_space_timeout_seconds"`
	LowWaterBytes   uint64  `json:"low_water_bytes"`
	BelowLowWater   bool    `json:"below_low_water"`
	MetadataBytes   uint64  `json:"metadata_bytes"`
	// DataHostBytes is the space the data file takes on the host file
	// system: freed blocks are punched out of it, so it follows
	// allocated_bytes (0 when unknown).
	DataHostBytes uint64 `json:"data_host_bytes"`
	// The data file's host file system (hostspace.go): its free space (0
	// when unknown, or for a preallocated pool, which needs none), how
	// much of the pool's free space it could not back now
	// (over-commitment: writes to unprovisioned space may fail, by the
	// no-space policy, when it runs out), and reservations without a
	// host-allocated spare (host.go; only when the host could not back
	// them; Check fails then).
	HostFreeBytes         uint64 `json:"host_free_bytes"`
	HostUnbackedBytes     uint64 `json:"host_unbacked_bytes"`
	ReservedUnbackedBytes uint64 `json:"reserved_unbacked_bytes"`
	HostBelowLowWater     bool   `json:"host_below_low_water"`
	// The metadata store's headroom on its file system (hostspace.go): held
	// now and wanted. Less held than wanted: that file system filled up
	// and the pool gives no new host space to data until it is restored.
	MetaHeadroomBytes     uint64 `json:"metadata_headroom_bytes"`
	MetaHeadroomWantBytes uint64 `json:"metadata_headroom_want_bytes"`
	// Preallocated: the whole data file is allocated on the host (pool
	// create --preallocate); the host cannot run out under it.
	Preallocated bool `json:"preallocated"`
	// DataDevice is the block device holding the data, if any.
	DataDevice       string `json:"data_device,omitempty"`
	VolumeCount      int    `json:"volume_count"`
	PendingMapWrites int    `json:"pending_map_changes"`
	// Failed is why the pool refuses requests after a failed commit
	// (empty while it serves); a restart recovers from the last commit.
	Failed string `json:"failed,omitempty"`
}

// VolumeStatus is one volume in Status.
type VolumeStatus struct {
	Name             string `json:"name"`
	SizeBytes        uint64 `json:"size_bytes"`
	MappedBytes      uint64 `json:"mapped_bytes"`
	ProvisionedBytes uint64 `json:"provisioned_bytes"`
	// ReservedBytes is all the pool holds for the volume: the sum of the
	// three reasons below.
	ReservedBytes uint64 `json:"reserved_bytes"`
	// ReservedProvisionedBytes: provisioned blocks of its own not yet
	// written (WRITE_ZEROES without unmap).
	ReservedProvisionedBytes uint64 `json:"reserved_provisioned_bytes"`
	// ReservedSharedBytes: one block per provisioned block it shares with
	// a snapshot, for the copy its next write there makes.
	ReservedSharedBytes uint64 `json:"reserved_shared_bytes"`
	// ReservedReserveModeBytes: in reserve mode, every other block of its
	// virtual size that it does not own.
	ReservedReserveModeBytes uint64 `json:"reserved_reserve_mode_bytes"`
	ReserveMode              bool   `json:"reserve_mode"`
	// Kind is "volume", "snapshot" (read-only) or "clone"; Origin is what
	// a snapshot or clone was taken of. A snapshot's or clone's byte
	// counts cover only what it changed itself since it was taken (or
	// since the snapshot above it was), not what it shares.
	Kind   string `json:"kind"`
	Origin string `json:"origin,omitempty"`
}

// Status is a consistent picture of the pool's space.
type Status struct {
	Pool    PoolStatus     `json:"pool"`
	Volumes []VolumeStatus `json:"volumes"`
}

// Status reports space use (O(volumes), no map walk).
func (p *Pool) Status() Status {
	disk := p.store.DiskUsage()
	var hostBytes uint64
	if d, ok := p.data.(interface{ hostBytes() (uint64, error) }); ok {
		hostBytes, _ = d.hostBytes()
	}
	hostFree, _, hostKnown := p.hostFreeBytes()
	p.mu.Lock()
	defer p.mu.Unlock()
	bs := uint64(p.blockSize)
	free := p.freeLocked()
	reserved := p.rec.Reserved + p.extra - p.inflightRes
	releasing := p.pend.count
	if p.pendOld != nil {
		releasing += p.pendOld.count
	}
	s := Status{Pool: PoolStatus{
		Dir:              p.dir,
		SizeBytes:        p.rec.SizeBlocks * bs,
		AllocatedBytes:   (p.rec.SizeBlocks - free - reserved) * bs,
		ReservedBytes:    reserved * bs,
		FreeBytes:        free * bs,
		ReleasingBytes:   releasing * bs,
		BlockSize:        uint32(bs),
		NoSpace:          NoSpacePolicy(p.rec.NoSpace).String(),
		NoSpaceTimeoutS:  time.Duration(p.rec.NoSpaceTimeout).Seconds(),
		LowWaterBytes:    p.lowWaterBlocks() * bs,
		BelowLowWater:    p.rec.LowWaterPPM != 0 && free < p.lowWaterBlocks(),
		MetadataBytes:    disk,
		DataHostBytes:    hostBytes,
		VolumeCount:      len(p.vols),
		PendingMapWrites: len(p.dirty),
		Failed:           errString(p.failed),
	}}
	have, want := p.store.Headroom()
	if hostKnown {
		s.Pool.HostFreeBytes = hostFree
		backable := hostFree
		if p.metaShared {
			// The headroom's missing pieces come back before data gets
			// new host space (restoreHeadroom).
			backable -= min(backable, uint64(want-have))
		}
		s.Pool.HostUnbackedBytes = hostShortfall(p.rec.SizeBlocks*bs, hostBytes, backable, free*bs)
		s.Pool.HostBelowLowWater = p.rec.LowWaterPPM != 0 && hostFree < p.lowWaterBlocks()*bs
	}
	s.Pool.ReservedUnbackedBytes = p.unbackedLocked() * bs
	s.Pool.MetaHeadroomBytes, s.Pool.MetaHeadroomWantBytes = uint64(have), uint64(want)
	s.Pool.Preallocated = p.rec.Flags&pebblemeta.PoolPreallocated != 0
	if d, ok := p.data.(interface{ isDevice() bool }); ok && d.isDevice() {
		s.Pool.DataDevice, _ = filepath.EvalSymlinks(filepath.Join(p.dir, dataName))
	}
	s.Volumes = make([]VolumeStatus, 0, len(p.vols))
	for name, v := range p.vols {
		vs := VolumeStatus{
			Name:                     name,
			SizeBytes:                v.rec.Size,
			MappedBytes:              v.rec.Mapped * bs,
			ProvisionedBytes:         v.rec.Provisioned * bs,
			ReservedBytes:            (v.rec.Reserved + v.extra) * bs,
			ReservedProvisionedBytes: v.rec.Reserved * bs,
			ReserveMode:              v.rec.ReserveMode,
			Kind:                     kindName(v.rec.Kind),
			Origin:                   v.rec.Origin,
		}
		if v.rec.ReserveMode {
			vs.ReservedReserveModeBytes = v.extra * bs
		} else {
			vs.ReservedSharedBytes = v.extra * bs
		}
		s.Volumes = append(s.Volumes, vs)
	}
	sort.Slice(s.Volumes, func(i, j int) bool { return s.Volumes[i].Name < s.Volumes[j].Name })
	return s
}

func kindName(k uint8) string {
	switch k {
	case pebblemeta.KindSnapshot:
		return "snapshot"
	case pebblemeta.KindClone:
		return "clone"
	}
	return "volume"
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
