package blk

// virtio-blk wire constants (virtio 1.2, 5.2).

// Request types.
const (
	TypeIn          = 0
	TypeOut         = 1
	TypeFlush       = 4
	TypeGetID       = 8
	TypeGetLifetime = 10
	TypeDiscard     = 11
	TypeWriteZeroes = 13
	TypeSecureErase = 14
)

// Status values written in the last byte of a request.
const (
	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

// Feature bits.
const (
	FeatureSizeMax     = 1
	FeatureSegMax      = 2
	FeatureGeometry    = 4
	FeatureRO          = 5
	FeatureBlkSize     = 6
	FeatureFlush       = 9
	FeatureTopology    = 10
	FeatureConfigWCE   = 11
	FeatureMQ          = 12
	FeatureDiscard     = 13
	FeatureWriteZeroes = 14
)

const (
	SectorSize = 512
	// RequestHeaderSize is struct virtio_blk_outhdr: type u32, ioprio u32,
	// sector u64.
	RequestHeaderSize = 16
	// DiscardSegmentSize is struct virtio_blk_discard_write_zeroes:
	// sector u64, num_sectors u32, flags u32.
	DiscardSegmentSize = 16
	// DiscardFlagUnmap is the unmap bit of a WRITE_ZEROES segment; every
	// other flag bit is reserved.
	DiscardFlagUnmap = 1
	// IDBytes is the length of the GET_ID answer.
	IDBytes = 20
)

// Config space offsets (struct virtio_blk_config).
const (
	ConfigCapacity              = 0  // u64, in 512-byte sectors
	ConfigSizeMax               = 8  // u32
	ConfigSegMax                = 12 // u32
	ConfigGeometry              = 16 // cylinders u16, heads u8, sectors u8
	ConfigBlkSize               = 20 // u32
	ConfigPhysicalBlockExp      = 24 // u8
	ConfigAlignmentOffset       = 25 // u8
	ConfigMinIOSize             = 26 // u16, in logical blocks
	ConfigOptIOSize             = 28 // u32, in logical blocks
	ConfigWritebackMode         = 32 // u8
	ConfigNumQueues             = 34 // u16
	ConfigMaxDiscardSectors     = 36 // u32
	ConfigMaxDiscardSeg         = 40 // u32
	ConfigDiscardSectorAlign    = 44 // u32
	ConfigMaxWriteZeroesSectors = 48 // u32
	ConfigMaxWriteZeroesSeg     = 52 // u32
	ConfigWriteZeroesMayUnmap   = 56 // u8
	ConfigSize                  = 60 // bytes up to and including the above, padded
)
