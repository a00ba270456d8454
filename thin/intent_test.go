package thin

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// A process killed (not a power cut: the page cache and so the data of
// completed writes survive) keeps every map change its completed requests
// made, without a FLUSH: allocating writes, copies on write under a
// snapshot, discards and provisioning are all there after reopening, and
// the accounting checks clean. After a power cut the intent log is
// dropped and the pool is as of its last commit.
func TestKilledProcessKeepsCompletedChanges(t *testing.T) {
	const bs = 4 * kib
	m := newMachine()
	if err := create("/pool", CreateOptions{Size: 512 * bs, BlockSize: bs}, m.env()); err != nil {
		t.Fatal(err)
	}
	p, err := open("/pool", quietOpts(), m.env())
	if err != nil {
		t.Fatal(err)
	}
	v := mustVolume(t, p, "v", 200*bs)
	want := make([][]byte, 200) // nil: zeros
	put := func(v *Volume, vb int, seed byte) {
		b := pattern(bs, seed)
		write(t, v, int64(vb)*bs, b)
		want[vb] = b
	}
	for vb := range 40 {
		put(v, vb, byte(vb))
	}
	if err := p.CreateSnapshot("v", "s", false); err != nil { // commits
		t.Fatal(err)
	}
	committed := make([][]byte, 200)
	copy(committed, want)
	for gen := 1; gen <= 2; gen++ {
		for vb := range 10 {
			put(v, vb, byte(100*gen+vb)) // copies on write (gen 1), overwrites (gen 2)
		}
		for vb := 40 + 40*gen; vb < 80+40*gen; vb++ {
			put(v, vb, byte(gen+vb)) // fresh blocks
		}
		if err := v.WriteZeroes(int64(20+gen*5)*bs, 5*bs, true); err != nil { // hides shared blocks
			t.Fatal(err)
		}
		for vb := 20 + gen*5; vb < 25+gen*5; vb++ {
			want[vb] = nil
		}
		if err := v.WriteZeroes(int64(190+gen)*bs, bs, false); err != nil { // a reservation
			t.Fatal(err)
		}
		p.abandon() // kill -9: nothing committed since the snapshot (or the last reopen)
		if p, err = open("/pool", quietOpts(), m.env()); err != nil {
			t.Fatal(err)
		}
		if v, err = p.Volume("v"); err != nil {
			t.Fatal(err)
		}
		for vb, w := range want {
			if w == nil {
				w = make([]byte, bs)
			}
			if got := read(t, v, int64(vb)*bs, bs); !bytes.Equal(got, w) {
				t.Fatalf("kill %d: block %d is not what the completed writes left there", gen, vb)
			}
		}
		s, err := p.Volume("s")
		if err != nil {
			t.Fatal(err)
		}
		for vb := range 40 {
			if got := read(t, s, int64(vb)*bs, bs); !bytes.Equal(got, committed[vb]) {
				t.Fatalf("kill %d: the snapshot's block %d changed", gen, vb)
			}
		}
		if err := p.Check(nil); err != nil {
			t.Fatalf("kill %d: %v", gen, err)
		}
		checkAccounting(t, p)
	}

	// A power cut: the intent log is not replayed (the page cache, and the
	// data it held, is gone); the pool is as of its last commit, the
	// reopen after the second kill.
	put(v, 199, 0x55)
	p.abandon()
	n := m.crash(rand.New(rand.NewPCG(1, 2)))
	if p, err = open("/pool", quietOpts(), n.env()); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if v, err = p.Volume("v"); err != nil {
		t.Fatal(err)
	}
	if got := read(t, v, 199*bs, bs); !bytes.Equal(got, make([]byte, bs)) {
		t.Fatal("after a power cut a write no commit covered was replayed")
	}
	if err := p.Check(nil); err != nil {
		t.Fatal(err)
	}
}
