// Command report turns one bench/run.sh pass (raw.csv and meta.csv) into
// the results of a kernel line: a Markdown table with medians, spreads and
// ratios, the same as CSV, a PNG bar chart of the ratios to loop, and a
// check of the targets of bench/README.md.
//
//	go run ./bench/report -in bench/out/6.12 -out bench/results -name 6.12 -loop-target 0.75
package main

import (
	"encoding/csv"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
)

// row is one workload of bench/run.sh.
type row struct {
	id    string // the name bench/run.sh uses
	title string // what a reader sees
	bw    bool   // measured in MiB/s rather than IOPS
}

var rows = []row{
	{"first4k", "4 KiB write, one per chunk, QD32 (first writes)", false},
	{"randw4k", "4 KiB randwrite QD32 (overwrites)", false},
	{"first1m", "1 MiB sequential write QD8 (first writes)", true},
	{"write1m", "1 MiB sequential write QD8 (overwrites)", true},
	{"randr4k", "4 KiB randread QD32 (image)", false},
	{"read1m", "1 MiB sequential read QD8 (image)", true},
}

// contenders in the order of the table.
var contenders = []string{"loop", "ublksnap", "ublksnap+s", "dm-snap", "dm-thin"}

// contenderTitles are the column headers.
var contenderTitles = map[string]string{
	"loop":       "kernel loop",
	"ublksnap":   "ublksnap, no snapshot",
	"ublksnap+s": "ublksnap, snapshot taken",
	"dm-snap":    "dm-snapshot (P)",
	"dm-thin":    "dm-thin",
}

// stat is the median and spread of one cell's runs.
type stat struct {
	median, min, max float64
	n                int
}

// spread is (max-min)/median, the relative width of the runs.
func (s stat) spread() float64 {
	if s.median == 0 {
		return 0
	}
	return (s.max - s.min) / s.median
}

// summarize returns the median, min and max of vs (the mean of the middle
// two for an even count).
func summarize(vs []float64) stat {
	if len(vs) == 0 {
		return stat{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{median: m, min: s[0], max: s[len(s)-1], n: len(s)}
}

// results holds one pass: the statistics by row and contender, and meta.
type results struct {
	cells map[string]map[string]stat // row id → contender → stat
	meta  map[string]string
}

func (r *results) cell(rowID, contender string) stat { return r.cells[rowID][contender] }

// ratio is a/b of two medians, 0 when b has none.
func (r *results) ratio(rowID, a, b string) float64 {
	den := r.cell(rowID, b).median
	if den == 0 {
		return 0
	}
	return r.cell(rowID, a).median / den
}

// readCSV reads a CSV file with a header line into records.
func readCSV(path string) ([][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(recs) == 0 {
		return nil, fmt.Errorf("%s: empty", path)
	}
	return recs[1:], nil
}

// load reads dir/raw.csv and dir/meta.csv.
func load(dir string) (*results, error) {
	raw, err := readCSV(filepath.Join(dir, "raw.csv"))
	if err != nil {
		return nil, err
	}
	values := map[string]map[string][]float64{}
	for i, rec := range raw {
		if len(rec) != 5 {
			return nil, fmt.Errorf("raw.csv line %d: %d fields, want 5", i+2, len(rec))
		}
		rowID, contender := rec[0], rec[1]
		col := 3 // IOPS
		if r, ok := findRow(rowID); !ok {
			return nil, fmt.Errorf("raw.csv line %d: unknown row %q", i+2, rowID)
		} else if r.bw {
			col = 4 // MiB/s
		}
		v, err := strconv.ParseFloat(rec[col], 64)
		if err != nil {
			return nil, fmt.Errorf("raw.csv line %d: %w", i+2, err)
		}
		if values[rowID] == nil {
			values[rowID] = map[string][]float64{}
		}
		values[rowID][contender] = append(values[rowID][contender], v)
	}
	res := &results{cells: map[string]map[string]stat{}, meta: map[string]string{}}
	for rowID, byContender := range values {
		res.cells[rowID] = map[string]stat{}
		for c, vs := range byContender {
			res.cells[rowID][c] = summarize(vs)
		}
	}
	meta, err := readCSV(filepath.Join(dir, "meta.csv"))
	if err != nil {
		return nil, err
	}
	for _, rec := range meta {
		if len(rec) == 2 {
			res.meta[rec[0]] = rec[1] // a key written twice keeps its last value
		}
	}
	return res, nil
}

func findRow(id string) (row, bool) {
	for _, r := range rows {
		if r.id == id {
			return r, true
		}
	}
	return row{}, false
}

// metaFloat returns a numeric meta value, 0 when absent.
func (r *results) metaFloat(key string) float64 {
	v, _ := strconv.ParseFloat(r.meta[key], 64)
	return v
}

// target is one goal of the issue, checked against a pass.
type target struct {
	what      string  // the goal, for a reader
	got, want float64 // measured ratio and the least that meets it
}

func (t target) met() bool { return t.got >= t.want }

// targets evaluates the goals of bench/README.md: no-snapshot against loop
// on every row, first writes against dm-snapshot, overwrites and image
// reads against the device without a snapshot, and peak memory.
func (r *results) targets(loopTarget float64) []target {
	var ts []target
	for _, rw := range rows {
		ts = append(ts, target{"ublksnap without snapshot / loop, " + rw.id, r.ratio(rw.id, "ublksnap", "loop"), loopTarget})
	}
	for _, id := range []string{"first4k", "first1m"} {
		ts = append(ts, target{"first writes / dm-snapshot, " + id, r.ratio(id, "ublksnap+s", "dm-snap"), 1.5})
	}
	for _, id := range []string{"randw4k", "write1m"} {
		ts = append(ts, target{"overwrites / no snapshot, " + id, r.ratio(id, "ublksnap+s", "ublksnap"), 0.95})
	}
	for _, id := range []string{"randr4k", "read1m"} {
		ts = append(ts, target{"image reads / no snapshot, " + id, r.ratio(id, "ublksnap+s", "ublksnap"), 0.9})
	}
	if hwm := r.metaFloat("daemon_vmhwm_kib") * 1024; hwm > 0 {
		budget := 64<<20 + r.metaFloat("diff_buffer_memory_limit_bytes")
		ts = append(ts, target{"daemon peak RSS within 64 MiB + diff_buffer_memory_limit (budget / peak)", budget / hwm, 1})
	}
	return ts
}

// cowBound returns the first-write rates the COW bound allows: 4 KiB
// writes per second when each copies one chunk, and MiB/s of chunks copied.
func (r *results) cowBound() (iops, mibs float64) {
	rd, wr := r.metaFloat("cow_bound_read_chunks_s"), r.metaFloat("cow_bound_write_chunks_s")
	if rd == 0 || wr == 0 {
		return 0, 0
	}
	perChunk := 1/rd + 1/wr
	return 1 / perChunk, r.metaFloat("chunk_bytes") / perChunk / (1 << 20)
}

func unit(rw row) string {
	if rw.bw {
		return "MiB/s"
	}
	return "IOPS"
}

func formatValue(v float64, rw row) string {
	if rw.bw {
		return fmt.Sprintf("%.0f", v)
	}
	return humanize.Commaf(float64(int64(v + 0.5)))
}

// writeMarkdown writes the report of one kernel line.
func (r *results) writeMarkdown(w io.Writer, name string, loopTarget float64) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Benchmark: kernel %s (line %s)\n\n", r.meta["kernel"], name)
	fmt.Fprintf(&b, "One VM boot under qemu TCG, %s CPUs; every device over its own tmpfs file of %s MiB; "+
		"chunk (and dm chunk/block) size %s; fio io_uring, direct=1, one job; "+
		"median of %s runs (spread = (max-min)/median), time-based rows %s s. "+
		"loop uses direct I/O: %s. Only ratios mean anything under TCG.\n\n",
		r.meta["cpus"], r.meta["size_mib"], humanize.IBytes(uint64(r.metaFloat("chunk_bytes"))),
		r.meta["runs"], r.meta["runtime_s"], r.meta["loop_dio"])
	b.WriteString("| workload | unit |")
	for _, c := range contenders {
		fmt.Fprintf(&b, " %s |", contenderTitles[c])
	}
	b.WriteString(" no-snap / loop | snap / dm-snap |\n|---|---|")
	for range contenders {
		b.WriteString("---:|")
	}
	b.WriteString("---:|---:|\n")
	for _, rw := range rows {
		fmt.Fprintf(&b, "| %s | %s |", rw.title, unit(rw))
		for _, c := range contenders {
			if s := r.cell(rw.id, c); s.n == 0 {
				b.WriteString(" – |")
			} else {
				fmt.Fprintf(&b, " %s ±%.0f%% |", formatValue(s.median, rw), 100*s.spread())
			}
		}
		fmt.Fprintf(&b, " %.2f | %.2f |\n", r.ratio(rw.id, "ublksnap", "loop"), r.ratio(rw.id, "ublksnap+s", "dm-snap"))
	}
	iops, mibs := r.cowBound()
	b.WriteString("\n## First writes against the COW bound\n\n")
	fmt.Fprintf(&b, "Reading one chunk and writing one chunk of tmpfs from user space (psync) allows %.0f first writes/s, "+
		"or %.0f MiB/s of chunks copied, one copy at a time.\n\n", iops, mibs)
	if iops > 0 {
		fmt.Fprintf(&b, "- 4 KiB one per chunk: ublksnap %.2f × the bound, dm-snapshot %.2f ×\n",
			r.cell("first4k", "ublksnap+s").median/iops, r.cell("first4k", "dm-snap").median/iops)
		fmt.Fprintf(&b, "- 1 MiB sequential: ublksnap %.2f × the bound, dm-snapshot %.2f ×\n",
			r.cell("first1m", "ublksnap+s").median/mibs, r.cell("first1m", "dm-snap").median/mibs)
	}
	b.WriteString("\n## Memory and storage\n\n")
	fmt.Fprintf(&b, "- daemon peak RSS (VmHWM) over the whole run, two devices and two images: %s (diff_buffer_memory_limit %s)\n",
		humanize.IBytes(uint64(r.metaFloat("daemon_vmhwm_kib")*1024)), humanize.IBytes(uint64(r.metaFloat("diff_buffer_memory_limit_bytes"))))
	fmt.Fprintf(&b, "- difference storage used after a run (one device, every chunk copied): %s\n",
		humanize.IBytes(uint64(r.metaFloat("ublksnap_diff_used_bytes"))))
	if s := r.meta["dm_snap_status"]; s != "" {
		fmt.Fprintf(&b, "- dm-snapshot status after a run (allocated/total metadata sectors): %s\n", s)
	}
	fmt.Fprintf(&b, "\n## Targets (no snapshot / loop ≥ %.2f on this line)\n\n| target | measured | wanted | |\n|---|---:|---:|---|\n", loopTarget)
	for _, t := range r.targets(loopTarget) {
		verdict := "met"
		switch {
		case t.got == 0:
			verdict = "**not measured**"
		case !t.met():
			verdict = fmt.Sprintf("**missed by %.0f%%**", 100*(1-t.got/t.want))
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.2f | %s |\n", t.what, t.got, t.want, verdict)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeCSV writes one line per row and contender: medians, spreads, ratios.
func (r *results) writeCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"kernel", "row", "unit", "contender", "median", "min", "max", "runs", "ratio_loop", "ratio_dm_snap"})
	for _, rw := range rows {
		for _, c := range contenders {
			s := r.cell(rw.id, c)
			f := func(v float64) string { return strconv.FormatFloat(v, 'f', 2, 64) }
			_ = cw.Write([]string{r.meta["kernel"], rw.id, unit(rw), c, f(s.median), f(s.min), f(s.max),
				strconv.Itoa(s.n), f(r.ratio(rw.id, c, "loop")), f(r.ratio(rw.id, c, "dm-snap"))})
		}
	}
	cw.Flush()
	return cw.Error()
}

func main() {
	in := flag.String("in", "", "directory with raw.csv and meta.csv of one bench/run.sh pass")
	out := flag.String("out", "bench/results", "directory for NAME.md, NAME.csv and NAME.png")
	name := flag.String("name", "", "name of the kernel line, e.g. 6.12")
	loopTarget := flag.Float64("loop-target", 0.9, "ratio to loop the device without snapshot must reach")
	flag.Parse()
	if *in == "" || *name == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: report -in DIR -name LINE [-out DIR] [-loop-target R]")
		os.Exit(2)
	}
	if err := run(*in, *out, *name, *loopTarget); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

func run(in, out, name string, loopTarget float64) error {
	res, err := load(in)
	if err != nil {
		return fmt.Errorf("read pass %s: %w", in, err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	base := filepath.Join(out, name)
	write := func(ext string, fn func(io.Writer) error) error {
		f, err := os.Create(base + ext)
		if err != nil {
			return err
		}
		return errors.Join(fn(f), f.Close())
	}
	if err := write(".md", func(w io.Writer) error { return res.writeMarkdown(w, name, loopTarget) }); err != nil {
		return err
	}
	if err := write(".csv", res.writeCSV); err != nil {
		return err
	}
	if err := res.writeChart(base+".png", name); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	fmt.Printf("report: %s.md, .csv, .png\n", base)
	return nil
}
