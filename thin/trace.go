package thin

import (
	"fmt"
	"strings"
)

// TraceFunc receives a debug note about volume ("" for the pool): the
// blocks a request resolved to, blocks released. See SetTrace.
type TraceFunc func(volume, text string)

// SetTrace makes the pool report, for every read and write, the physical
// blocks its virtual blocks resolved to (`thinblk serve --trace`); nil
// turns it off. The notes are formatted only while it is set.
func (p *Pool) SetTrace(fn TraceFunc) {
	if fn == nil {
		p.trace.Store(nil)
		return
	}
	p.trace.Store(&fn)
}

// traceRead notes a read's blocks: VB:PB per block, VB:- for a block that
// reads as zeros. pbs[i] is the block of virtual block first+i.
func (p *Pool) traceRead(t *TraceFunc, vol, how string, off, n int64, pbs []int64) {
	var sb strings.Builder
	first := off >> p.shift
	for i, pb := range pbs {
		if i > 0 {
			sb.WriteByte(',')
		}
		if pb < 0 {
			fmt.Fprintf(&sb, "%d:-", first+int64(i))
		} else {
			fmt.Fprintf(&sb, "%d:%d", first+int64(i), pb)
		}
	}
	(*t)(vol, fmt.Sprintf("%s %d %d blocks %s", how, off, n, sb.String()))
}

// traceWrite notes a write's plan: VB:PB per block, with "+new" for a block
// it allocates ("+new0" when the new block is known to read as zeros, so
// only the written bytes are written), "+cow=PB" for a copy of a shared one.
func (p *Pool) traceWrite(t *TraceFunc, vol string, off, n int64, plans []writePlan) {
	var sb strings.Builder
	for i, pl := range plans {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, "%d:%d", pl.vb, pl.pblock)
		if pl.f != nil {
			sb.WriteString("+new")
			if pl.f.zero {
				sb.WriteString("0")
			}
			if pl.cow >= 0 {
				fmt.Fprintf(&sb, "+cow=%d", pl.cow)
			}
		}
	}
	(*t)(vol, fmt.Sprintf("write %d %d blocks %s", off, n, sb.String()))
}
