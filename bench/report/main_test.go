package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want stat
	}{
		{nil, stat{}},
		{[]float64{3}, stat{median: 3, min: 3, max: 3, n: 1}},
		{[]float64{5, 1, 3}, stat{median: 3, min: 1, max: 5, n: 3}},
		{[]float64{4, 1, 2, 8}, stat{median: 3, min: 1, max: 8, n: 4}},
	} {
		if got := summarize(tc.in); got != tc.want {
			t.Errorf("summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
	if s := (stat{median: 100, min: 90, max: 110}).spread(); s != 0.2 {
		t.Errorf("spread = %v, want 0.2", s)
	}
}

// TestReportFromPass writes a pass the way bench/run.sh does and checks the
// medians, ratios, targets and the three files of the report.
func TestReportFromPass(t *testing.T) {
	in := t.TempDir()
	raw := "row,contender,run,iops,mib_s\n"
	for _, l := range []string{
		"first4k,loop,1,1000,4", "first4k,loop,2,3000,12", "first4k,loop,3,2000,8",
		"first4k,ublksnap,1,1900,7", "first4k,ublksnap+s,1,600,2", "first4k,dm-snap,1,300,1",
		"read1m,loop,1,100,400", "read1m,ublksnap,1,90,360", "read1m,ublksnap+s,1,80,300",
		"read1m,dm-snap,1,100,380", "read1m,dm-thin,1,100,390",
	} {
		raw += l + "\n"
	}
	meta := "key,value\nkernel,7.3.4\nchunk_bytes,262144\nruns,3\ndaemon_vmhwm_kib,65536\n" +
		"diff_buffer_memory_limit_bytes,67108864\ncow_bound_read_chunks_s,1000\ncow_bound_write_chunks_s,1000\n"
	for name, data := range map[string]string{"raw.csv": raw, "meta.csv": meta} {
		if err := os.WriteFile(filepath.Join(in, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	res, err := load(in)
	if err != nil {
		t.Fatal(err)
	}
	if got := res.cell("first4k", "loop").median; got != 2000 {
		t.Errorf("loop median = %v, want 2000", got)
	}
	if got := res.ratio("first4k", "ublksnap+s", "dm-snap"); got != 2 {
		t.Errorf("first writes / dm-snap = %v, want 2", got)
	}
	if got := res.ratio("read1m", "ublksnap", "loop"); got != 0.9 { // MiB/s for 1 MiB rows
		t.Errorf("read1m ratio = %v, want 0.9", got)
	}
	if iops, mibs := res.cowBound(); iops != 500 || mibs != 125 {
		t.Errorf("cow bound = %v IOPS, %v MiB/s; want 500, 125", iops, mibs)
	}
	verdicts := map[string]bool{}
	for _, tg := range res.targets(0.9) {
		verdicts[tg.what] = tg.met()
	}
	for what, want := range map[string]bool{
		"ublksnap without snapshot / loop, first4k": true,  // 1900/2000
		"ublksnap without snapshot / loop, read1m":  true,  // 360/400
		"first writes / dm-snapshot, first4k":       true,  // 600/300
		"image reads / no snapshot, read1m":         false, // 300/360
	} {
		if got, ok := verdicts[what]; !ok || got != want {
			t.Errorf("target %q met = %v (present %v), want %v", what, got, ok, want)
		}
	}

	out := t.TempDir()
	if err := run(in, out, "7", 0.9); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(out, "7.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kernel 7.3.4", "| 2,000 ±100% |", "**missed by", "**not measured**"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	for _, f := range []string{"7.csv", "7.png"} {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}

func TestLoadRejectsUnknownRow(t *testing.T) {
	in := t.TempDir()
	os.WriteFile(filepath.Join(in, "raw.csv"), []byte("row,contender,run,iops,mib_s\nbogus,loop,1,1,1\n"), 0o644)
	os.WriteFile(filepath.Join(in, "meta.csv"), []byte("key,value\n"), 0o644)
	if _, err := load(in); err == nil || !strings.Contains(err.Error(), "unknown row") {
		t.Fatalf("load = %v, want an unknown row error", err)
	}
}
