package main

import (
	"fmt"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// gain is how many times better than loop a contender's median is: the
// ratio to loop, inverted for a latency row.
func (r *results) gain(rw row, c string) float64 {
	if rw.metric == latency {
		return div(1, r.ratio(rw.id, c, "loop"))
	}
	return r.ratio(rw.id, c, "loop")
}

// writeChart draws, per workload, one bar per contender: its median's gain
// over the kernel's loop device, with a line at 1.
func (r *results) writeChart(path, name string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("ublksnap vs loop, dm-snapshot, dm-thin: kernel %s (line %s), median of %s runs",
		r.meta["kernel"], name, r.meta["runs"])
	p.Y.Label.Text = "ratio to the kernel loop device (higher is better; lat4k: loop's latency / its)"
	p.Legend.Top = true
	p.Legend.Left = true
	names := make([]string, len(rows))
	for i, rw := range rows {
		names[i] = rw.id
	}
	p.NominalX(names...)

	barWidth := vg.Points(14)
	shown := contenders[1:] // loop is the line at 1
	top := 1.0
	for i, c := range shown {
		vals := make(plotter.Values, len(rows))
		for j, rw := range rows {
			vals[j] = r.gain(rw, c)
			top = max(top, vals[j])
		}
		bars, err := plotter.NewBarChart(vals, barWidth)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(i)
		bars.Offset = barWidth * vg.Length(2*i-len(shown)+1) / 2
		p.Add(bars)
		p.Legend.Add(contenderTitles[c], bars)
	}
	one := plotter.NewFunction(func(float64) float64 { return 1 })
	one.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	p.Add(one)
	p.Legend.Add("kernel loop = 1", one)
	p.Y.Min, p.Y.Max = 0, top*1.3 // room for the legend above the bars
	return p.Save(26*vg.Centimeter, 14*vg.Centimeter, path)
}
