package bench

import (
	"bytes"
	"errors"
	"fmt"
	"image/color"
	"path/filepath"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"

	"github.com/vmhistory/vmhistory/safefile"
)

// ChartKind is how a chart draws its series.
type ChartKind int

const (
	// ChartLines joins each series' points with a line (a value per step).
	ChartLines ChartKind = iota
	// ChartScatter draws each point alone, with its label beside it
	// (ratio against throughput, one point per algorithm).
	ChartScatter
	// ChartBars draws one group of bars per category (Chart.Categories),
	// one bar per series.
	ChartBars
)

// Series is one named set of points. X is ignored by ChartBars (the
// categories are the X axis); Labels, when set, name each point of a
// scatter.
type Series struct {
	Name   string
	X, Y   []float64
	Labels []string
}

// Chart is a picture of a bench's result, written as SVG or PNG by the
// file name's extension.
type Chart struct {
	Title, XLabel, YLabel string
	Kind                  ChartKind
	Series                []Series
	// Categories are the X axis of ChartBars.
	Categories []string
	// LogY draws the Y axis on a log scale (sizes spanning decades).
	LogY bool
}

// CheckChartPath rejects a file name the chart cannot be written as,
// before a long bench runs.
func CheckChartPath(path string) error {
	switch strings.ToLower(filepath.Ext(path)) {
	case ".svg", ".png":
		return nil
	}
	return fmt.Errorf("chart %q: the name must end in .svg or .png", path)
}

// Write draws the chart into path (.svg or .png).
func (c *Chart) Write(path string) error {
	if err := CheckChartPath(path); err != nil {
		return err
	}
	if len(c.Series) == 0 {
		return errors.New("chart: nothing to draw")
	}
	p := plot.New()
	p.Title.Text = c.Title
	p.X.Label.Text = c.XLabel
	p.Y.Label.Text = c.YLabel
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	if c.LogY {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	var err error
	switch c.Kind {
	case ChartBars:
		err = c.addBars(p)
	case ChartScatter:
		err = c.addScatter(p)
	default:
		err = c.addLines(p)
	}
	if err != nil {
		return fmt.Errorf("chart %s: %w", path, err)
	}
	if !c.LogY && c.Kind != ChartScatter {
		// Headroom above the data for the legend, which would hide the
		// top points otherwise.
		p.Y.Max += (p.Y.Max - min(p.Y.Min, 0)) * 0.06 * float64(len(c.Series)+1)
	}
	width := 8 * vg.Inch
	if n := len(c.Categories); c.Kind == ChartBars && n > 8 {
		width = vg.Length(n) * vg.Inch
	}
	w, err := p.WriterTo(width, 5*vg.Inch, strings.TrimPrefix(filepath.Ext(path), "."))
	if err != nil {
		return fmt.Errorf("chart %s: %w", path, err)
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		return fmt.Errorf("chart %s: %w", path, err)
	}
	// The bench runs as root: never through a link planted at path.
	if err := safefile.WriteFileAtomic(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("chart %s: %w", path, err)
	}
	return nil
}

func points(s Series) (plotter.XYs, error) {
	if len(s.X) != len(s.Y) {
		return nil, fmt.Errorf("series %q has %d x and %d y values", s.Name, len(s.X), len(s.Y))
	}
	xys := make(plotter.XYs, len(s.X))
	for i := range s.X {
		xys[i] = plotter.XY{X: s.X[i], Y: s.Y[i]}
	}
	return xys, nil
}

func (c *Chart) addLines(p *plot.Plot) error {
	for i, s := range c.Series {
		xys, err := points(s)
		if err != nil {
			return err
		}
		line, pts, err := plotter.NewLinePoints(xys)
		if err != nil {
			return err
		}
		line.Color = plotutil.Color(i)
		line.Dashes = plotutil.Dashes(i / 7)
		pts.Color = plotutil.Color(i)
		pts.Shape = plotutil.Shape(i)
		p.Add(line, pts)
		p.Legend.Add(s.Name, line, pts)
	}
	return nil
}

func (c *Chart) addScatter(p *plot.Plot) error {
	for i, s := range c.Series {
		xys, err := points(s)
		if err != nil {
			return err
		}
		sc, err := plotter.NewScatter(xys)
		if err != nil {
			return err
		}
		sc.Color = plotutil.Color(i)
		sc.Shape = plotutil.Shape(i)
		p.Add(sc)
		if len(c.Series) > 1 {
			p.Legend.Add(s.Name, sc)
		}
		if len(s.Labels) == len(s.X) && len(s.X) > 0 {
			labels, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: s.Labels})
			if err != nil {
				return err
			}
			for j := range labels.TextStyle {
				labels.TextStyle[j].Color = color.Gray{Y: 60}
				labels.TextStyle[j].XAlign = -0.0
			}
			labels.Offset = vg.Point{X: 4, Y: 2}
			p.Add(labels)
		}
	}
	return nil
}

func (c *Chart) addBars(p *plot.Plot) error {
	if len(c.Categories) == 0 {
		return errors.New("a bar chart needs categories")
	}
	n := len(c.Series)
	w := vg.Points(min(40, 360/float64(max(n*len(c.Categories), 1))))
	for i, s := range c.Series {
		if len(s.Y) != len(c.Categories) {
			return fmt.Errorf("series %q has %d values for %d categories", s.Name, len(s.Y), len(c.Categories))
		}
		bars, err := plotter.NewBarChart(plotter.Values(s.Y), w)
		if err != nil {
			return err
		}
		bars.Color = plotutil.Color(i)
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(float64(i)-float64(n-1)/2)
		p.Add(bars)
		p.Legend.Add(s.Name, bars)
	}
	p.NominalX(c.Categories...)
	return nil
}
