package pebblemeta

import (
	"bytes"
	"errors"
	"math"
	"testing"
)

func TestEntryRoundTrip(t *testing.T) {
	for _, e := range []Entry{
		{Flags: FlagMapped, PBlock: 0},
		{Flags: FlagMapped, PBlock: math.MaxUint64},
		{Flags: FlagMapped | FlagProvisioned, PBlock: 12345},
		{Flags: FlagProvisioned},
		{Flags: FlagHole},
	} {
		got, err := DecodeEntry(AppendEntry(nil, e))
		if err != nil || got != e {
			t.Errorf("round trip %+v: got %+v, %v", e, got, err)
		}
	}
	if !(Entry{Flags: FlagProvisioned}).Reserved() || (Entry{Flags: FlagProvisioned | FlagMapped}).Reserved() {
		t.Error("Reserved() wrong")
	}
}

func TestEntryRejectsGarbage(t *testing.T) {
	for _, v := range [][]byte{nil, {0}, {8}, {FlagHole | FlagMapped, 1}, {FlagHole, 0}, {0x80 | FlagMapped, 1}, {FlagMapped}, {FlagMapped, 0x80}, {FlagProvisioned, 0}, {FlagMapped, 1, 2}} {
		if _, err := DecodeEntry(v); !errors.Is(err, ErrCorrupt) {
			t.Errorf("DecodeEntry(%x) = %v, want ErrCorrupt", v, err)
		}
	}
}

func TestMapKeyOrder(t *testing.T) {
	a := AppendMapKey(nil, 1, 255)
	b := AppendMapKey(nil, 1, 256)
	c := AppendMapKey(nil, 2, 0)
	if !(bytes.Compare(a, b) < 0 && bytes.Compare(b, c) < 0) {
		t.Fatal("map keys do not sort by (layer, block)")
	}
	l, vb, err := ParseMapKey(b)
	if err != nil || l != 1 || vb != 256 {
		t.Fatalf("ParseMapKey = %d %d %v", l, vb, err)
	}
	lo, hi := mapLayerBounds(math.MaxUint64)
	if bytes.Compare(lo, hi) >= 0 || bytes.Compare(AppendMapKey(nil, math.MaxUint64, math.MaxUint64), hi) >= 0 {
		t.Fatal("bounds of the last layer are wrong")
	}
}

func TestRecordsRoundTrip(t *testing.T) {
	p := PoolRecord{BlockSize: 65536, SizeBlocks: 1 << 40, NoSpace: 1, NoSpaceTimeout: 60e9, LowWaterPPM: 100000, NextLayer: 7, Allocated: 5, Reserved: 3, ZeroFrom: 9}
	gp, err := DecodePoolRecord(AppendPoolRecord(nil, p))
	if err != nil || gp != p {
		t.Fatalf("pool record: %+v %v", gp, err)
	}
	v := VolumeRecord{Layer: 3, Size: 1 << 36, Mapped: 10, Provisioned: 4, Reserved: 2}
	gv, err := DecodeVolumeRecord(AppendVolumeRecord(nil, v))
	if err != nil || gv != v {
		t.Fatalf("volume record: %+v %v", gv, err)
	}
	enc := AppendVolumeRecord(nil, v)
	if _, err := DecodeVolumeRecord(append(enc, 0)); !errors.Is(err, ErrCorrupt) {
		t.Fatal("trailing byte accepted")
	}
	enc[0] = 2
	if _, err := DecodeVolumeRecord(enc); !errors.Is(err, ErrCorrupt) {
		t.Fatal("unknown record version accepted")
	}
	// A snapshot's stream id round-trips; a zero or short one is corrupt.
	sv := VolumeRecord{Layer: 5, Size: 512, Kind: KindSnapshot, Origin: "vm1", ChainProv: 0, StreamID: [16]byte{1, 2, 3, 15: 9}}
	senc := AppendVolumeRecord(nil, sv)
	if gv, err := DecodeVolumeRecord(senc); err != nil || gv != sv {
		t.Fatalf("snapshot record with stream id: %+v %v", gv, err)
	}
	if _, err := DecodeVolumeRecord(senc[:len(senc)-1]); !errors.Is(err, ErrCorrupt) {
		t.Fatal("truncated stream id accepted")
	}
	zid := append(senc[:len(senc)-16:len(senc)-16], make([]byte, 16)...)
	if _, err := DecodeVolumeRecord(zid); !errors.Is(err, ErrCorrupt) {
		t.Fatal("zero stream id accepted")
	}
	// A record from before ZeroFrom existed decodes with nothing known zero.
	old := AppendPoolRecord(nil, p)
	old = old[:len(old)-1]
	if gp, err := DecodePoolRecord(old); err != nil || gp.ZeroFrom != p.SizeBlocks {
		t.Fatalf("record without zero mark: %+v %v", gp, err)
	}
	if _, err := DecodePoolRecord(AppendPoolRecord(nil, p)[:5]); !errors.Is(err, ErrCorrupt) {
		t.Fatal("truncated pool record accepted")
	}
	// Flags are encoded only when set: a pool without them reads as
	// before; with them, they round-trip; a zero encoded is corrupt.
	pf := p
	pf.Flags = PoolPreallocated
	if gp, err := DecodePoolRecord(AppendPoolRecord(nil, pf)); err != nil || gp != pf {
		t.Fatalf("pool record with flags: %+v %v", gp, err)
	}
	if len(AppendPoolRecord(nil, pf)) != len(AppendPoolRecord(nil, p))+1 {
		t.Fatal("flags changed the encoding of a pool without them")
	}
	if _, err := DecodePoolRecord(append(AppendPoolRecord(nil, p), 0)); !errors.Is(err, ErrCorrupt) {
		t.Fatal("zero flags encoded accepted")
	}
}

func TestVolumeNames(t *testing.T) {
	for _, ok := range []string{"a", "vm-1_disk.0", "x@y:z+1"} {
		if err := ValidVolumeName(ok); err != nil {
			t.Errorf("%q rejected: %v", ok, err)
		}
		got, err := ParseVolumeKey(VolumeKey(ok))
		if err != nil || got != ok {
			t.Errorf("volume key %q: %q %v", ok, got, err)
		}
	}
	long := string(bytes.Repeat([]byte("a"), MaxVolumeNameLen+1))
	for _, bad := range []string{"", "a/b", "/", ".", "..", "a b", "ü", long, "a\x00"} {
		if err := ValidVolumeName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzEntry(f *testing.F) {
	f.Add([]byte{FlagMapped, 5})
	f.Add([]byte{FlagProvisioned})
	f.Add([]byte{FlagMapped | FlagProvisioned, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte{0xff})
	f.Add([]byte{FlagMapped, 0xdb, 0x00}) // overlong varint
	f.Fuzz(func(t *testing.T, v []byte) {
		e, err := DecodeEntry(v)
		if err != nil {
			return
		}
		// Accepted input must be canonical: re-encoding gives the same bytes
		// (so two encodings never mean one entry).
		if got := AppendEntry(nil, e); !bytes.Equal(got, v) {
			t.Fatalf("entry %x decoded to %+v, re-encodes to %x", v, e, got)
		}
	})
}

func FuzzRecords(f *testing.F) {
	f.Add(AppendPoolRecord(nil, PoolRecord{BlockSize: 4096, SizeBlocks: 100}))
	f.Add(AppendVolumeRecord(nil, VolumeRecord{Layer: 1, Size: 512}))
	f.Add([]byte{1, 0x80})
	f.Add([]byte{1, 0x81, 0x00, 1, 1, 1}) // overlong varint
	f.Add(AppendVolumeRecord(nil, VolumeRecord{Layer: 4, Size: 512, Kind: KindSnapshot, Origin: "vm1"}))
	f.Add(AppendVolumeRecord(nil, VolumeRecord{Layer: 4, Size: 512, Kind: KindClone, Origin: "vm1", ChainProv: 3, ReserveMode: true}))
	f.Add(AppendLayerRecord(nil, LayerRecord{Parent: 3, Frozen: true, Mapped: 9, Provisioned: 2, Reserved: 1}))
	f.Add(AppendVolumeRecord(nil, VolumeRecord{Layer: 4, Size: 512, Kind: KindSnapshot, Origin: "vm1", StreamID: [16]byte{7, 1}}))
	f.Fuzz(func(t *testing.T, v []byte) {
		if l, err := DecodeLayerRecord(v); err == nil {
			l2, err := DecodeLayerRecord(AppendLayerRecord(nil, l))
			if err != nil || l2 != l {
				t.Fatalf("layer record %+v does not round-trip: %+v %v", l, l2, err)
			}
		}
		if p, err := DecodePoolRecord(v); err == nil {
			p2, err := DecodePoolRecord(AppendPoolRecord(nil, p))
			if err != nil || p2 != p {
				t.Fatalf("pool record %+v does not round-trip: %+v %v", p, p2, err)
			}
		}
		if r, err := DecodeVolumeRecord(v); err == nil {
			r2, err := DecodeVolumeRecord(AppendVolumeRecord(nil, r))
			if err != nil || r2 != r {
				t.Fatalf("volume record %+v does not round-trip: %+v %v", r, r2, err)
			}
		}
	})
}

func FuzzKeys(f *testing.F) {
	f.Add(AppendMapKey(nil, 1, 2))
	f.Add(VolumeKey("vol"))
	f.Add(AppendBitmapKey(nil, 9))
	f.Add([]byte("v/x"))
	f.Add(AppendLayerKey(nil, 5))
	f.Fuzz(func(t *testing.T, k []byte) {
		if l, err := ParseLayerKey(k); err == nil && !bytes.Equal(AppendLayerKey(nil, l), k) {
			t.Fatalf("layer key %x not canonical", k)
		}
		if l, vb, err := ParseMapKey(k); err == nil && !bytes.Equal(AppendMapKey(nil, l, vb), k) {
			t.Fatalf("map key %x not canonical", k)
		}
		if name, err := ParseVolumeKey(k); err == nil {
			if !bytes.Equal(VolumeKey(name), k) || ValidVolumeName(name) != nil {
				t.Fatalf("volume key %x gave bad name %q", k, name)
			}
		}
		if idx, err := ParseBitmapKey(k); err == nil && !bytes.Equal(AppendBitmapKey(nil, idx), k) {
			t.Fatalf("bitmap key %x not canonical", k)
		}
	})
}

func TestLayerAndKindRecords(t *testing.T) {
	l := LayerRecord{Parent: 7, Frozen: true, Mapped: 300, Provisioned: 2, Reserved: 1}
	got, err := DecodeLayerRecord(AppendLayerRecord(nil, l))
	if err != nil || got != l {
		t.Fatalf("layer record round trip: %+v, %v", got, err)
	}
	if _, err := DecodeLayerRecord(append(AppendLayerRecord(nil, l), 0)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("trailing byte accepted: %v", err)
	}
	v := VolumeRecord{Layer: 3, Size: 4096, Kind: KindClone, Origin: "vm1"}
	gv, err := DecodeVolumeRecord(AppendVolumeRecord(nil, v))
	v.Name = ""
	if err != nil || gv != v {
		t.Fatalf("volume record with kind round trip: %+v, %v", gv, err)
	}
	for _, v := range []VolumeRecord{
		{Layer: 3, Size: 4096, Provisioned: 2, ChainProv: 9},
		{Layer: 3, Size: 4096, Provisioned: 2, ChainProv: 2, ReserveMode: true},
		{Layer: 5, Size: 4096, Kind: KindClone, Origin: "vm1", ChainProv: 7, ReserveMode: true},
	} {
		if gv, err := DecodeVolumeRecord(AppendVolumeRecord(nil, v)); err != nil || gv != v {
			t.Fatalf("volume record %+v round trip: %+v, %v", v, gv, err)
		}
	}
	// Records from before ChainProv: it is the head's own count.
	if gv, err := DecodeVolumeRecord(AppendVolumeRecord(nil, VolumeRecord{Layer: 3, Size: 4096, Provisioned: 4, ChainProv: 4})); err != nil || gv.ChainProv != 4 {
		t.Fatalf("record without ChainProv: %+v, %v", gv, err)
	}
	if b := AppendVolumeRecord(nil, VolumeRecord{Layer: 3, Size: 4096, Provisioned: 2, ChainProv: 3}); decodes(b[:len(b)-1]) {
		t.Fatal("truncated volume flags accepted")
	}
	old := VolumeRecord{Layer: 3, Size: 4096}
	if b := AppendVolumeRecord(nil, old); len(b) != 7 {
		t.Fatalf("a plain volume record changed its encoding: %x", b)
	}
	bad := AppendVolumeRecord(nil, VolumeRecord{Layer: 3, Size: 4096, Kind: KindClone, Origin: "a/b"})
	if _, err := DecodeVolumeRecord(bad); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("bad origin accepted: %v", err)
	}
	if _, err := DecodeVolumeRecord(bad[:len(bad)-1]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("truncated origin accepted: %v", err)
	}
}

// decodes reports whether b decodes.
func decodes(b []byte) bool {
	_, err := DecodeVolumeRecord(b)
	return err == nil
}
