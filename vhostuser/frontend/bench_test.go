package frontend

import (
	"testing"
	"time"

	"github.com/thinblk/thinblk/virtio/blk"
)

// BenchmarkRead4K measures 4 KiB reads through the driver: one at a time
// (the round-trip latency) and 32 in flight (throughput), against every
// back-end. Run: go test -run XXX -bench . -benchtime 2s ./vhostuser/frontend
func BenchmarkRead4K(b *testing.B) {
	for _, be := range backends() {
		for _, qd := range []int{1, 32} {
			b.Run(be.name+"/qd"+itoa(qd), func(b *testing.B) {
				img := newImage(b, imgSize)
				d := dial(b, be.start(b, img, serveOpts{queues: 1}), Options{QueueSize: 256})
				q := d.Queue(0)
				reqs := make([]*Req, qd)
				for i := range reqs {
					r, err := q.NewReq(1)
					if err != nil {
						b.Fatal(err)
					}
					buf, err := d.Memory().Alloc(4096, 4096)
					if err != nil {
						b.Fatal(err)
					}
					r.Type, r.Sector, r.Data, r.Indirect = blk.TypeIn, uint64(i*8), []Buffer{buf}, true
					reqs[i] = r
				}
				b.SetBytes(4096)
				b.ReportAllocs()
				b.ResetTimer()
				if err := q.Submit(reqs...); err != nil {
					b.Fatal(err)
				}
				inFlight, submitted := qd, qd
				done := make([]*Req, 0, qd)
				for inFlight > 0 {
					var err error
					if done, err = q.Wait(done[:0], 10*time.Second); err != nil {
						b.Fatal(err)
					}
					inFlight -= len(done)
					n := min(len(done), b.N-submitted)
					if n > 0 {
						if err := q.Submit(done[:n]...); err != nil {
							b.Fatal(err)
						}
						inFlight += n
						submitted += n
					}
				}
				b.StopTimer()
				s := q.Stats()
				b.ReportMetric(float64(s.Kicks)/float64(submitted), "kicks/op")
				b.ReportMetric(float64(s.Waits)/float64(submitted), "waits/op")
			})
		}
	}
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}
