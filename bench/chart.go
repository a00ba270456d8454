package bench

import (
	"fmt"
	"image/color"
	"io"
	"math"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// chartStyle is how one target looks in the chart: the same colour and
// mark in both panels.
type chartStyle struct {
	color color.Color
	shape draw.GlyphDrawer
}

var chartStyles = map[string]chartStyle{
	"thinblk": {color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}, draw.CircleGlyph{}},
	"qsd":     {color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}, draw.BoxGlyph{}},
	"null":    {color.RGBA{R: 0x7f, G: 0x7f, B: 0x7f, A: 0xff}, draw.RingGlyph{}},
	"fio":     {color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}, draw.PyramidGlyph{}},
}

// chartLabels are the legend's names for the targets.
var chartLabels = map[string]string{
	"thinblk": "thinblk serve --raw",
	"qsd":     "qemu-storage-daemon",
	"null":    "thinblk serve --null (no I/O)",
	"fio":     "fio on the host file",
}

// WriteChart draws results as an SVG: IOPS above, p99 latency below, one
// column per case (in the order of cases) and one mark per target (in the
// order of targets), both on log scales so that a 1 MiB case and a QD128
// case read on one chart; the legend is in the upper panel. Cells without a result (missing, failed) are
// left out.
func WriteChart(w io.Writer, title string, cases []string, targets []string, results []Result) error {
	if len(cases) == 0 || len(targets) == 0 {
		return fmt.Errorf("chart: no cases or no targets")
	}
	by := map[[2]string]Result{}
	for _, r := range results {
		if r.Err == "" && r.IOPS > 0 {
			by[[2]string{r.Target, r.Case}] = r
		}
	}
	panel := func(ylabel string, legend bool, value func(Result) float64) (*plot.Plot, error) {
		p := plot.New()
		p.Y.Label.Text = ylabel
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		p.NominalX(cases...)
		p.X.Tick.Label.Rotation = math.Pi / 6
		p.X.Tick.Label.XAlign = draw.XRight
		p.X.Tick.Label.YAlign = draw.YCenter
		p.Add(plotter.NewGrid())
		p.Legend.Top, p.Legend.Left = true, true
		p.Legend.Padding = vg.Millimeter
		p.Legend.ThumbnailWidth = vg.Centimeter
		p.Legend.XOffs = vg.Millimeter * 2
		lo, hi := math.Inf(1), math.Inf(-1)
		for ti, t := range targets {
			var xys plotter.XYs
			for ci, c := range cases {
				r, ok := by[[2]string{t, c}]
				if v := value(r); ok && v > 0 {
					// Marks of one case side by side, centred on its tick.
					off := (float64(ti) - float64(len(targets)-1)/2) * 0.15
					xys = append(xys, plotter.XY{X: float64(ci) + off, Y: v})
					lo, hi = min(lo, v), max(hi, v)
				}
			}
			if len(xys) == 0 {
				continue
			}
			s, err := plotter.NewScatter(xys)
			if err != nil {
				return nil, err
			}
			st, ok := chartStyles[t]
			if !ok {
				st = chartStyle{color.Black, draw.CrossGlyph{}}
			}
			s.GlyphStyle = draw.GlyphStyle{Color: st.color, Radius: vg.Points(3.5), Shape: st.shape}
			p.Add(s)
			label := chartLabels[t]
			if label == "" {
				label = t
			}
			if legend {
				p.Legend.Add(label, s)
			}
		}
		if lo > hi {
			return nil, fmt.Errorf("chart: no results to draw for %s", ylabel)
		}
		p.Y.Min, p.Y.Max = lo/2, hi*2
		if legend {
			// Room for the legend above the highest mark.
			p.Y.Max = hi * 4
		}
		p.X.Min, p.X.Max = -0.6, float64(len(cases))-0.4
		return p, nil
	}
	iops, err := panel("IOPS (log scale; higher is better)", true, func(r Result) float64 { return r.IOPS })
	if err != nil {
		return err
	}
	iops.Title.Text = title
	p99, err := panel("p99 latency, us (log scale; lower is better)", false, func(r Result) float64 { return r.P99Us })
	if err != nil {
		return err
	}
	width, height := vg.Length(max(16, 1.6*float64(len(cases))))*vg.Centimeter, 24*vg.Centimeter
	canvas := vgsvg.New(width, height)
	tiles := draw.Tiles{Rows: 2, Cols: 1, PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4, PadY: vg.Millimeter * 6}
	plots := [][]*plot.Plot{{iops}, {p99}}
	cells := plot.Align(plots, tiles, draw.New(canvas))
	for i := range plots {
		plots[i][0].Draw(cells[i][0])
	}
	_, err = canvas.WriteTo(w)
	return err
}
