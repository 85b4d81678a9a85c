package devconf

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const sample = `# declared devices
data /dev/disk/by-id/nvme-X-part2 queues=2 depth=64   # the database
vm   /srv/vm.img io-mode=user-copy

data /srv/other.img
bad  relative/path
typo /srv/t.img qeues=2
q0   /srv/q.img queues=0
lone
`

// Good lines come back with their line numbers; each bad one is an error
// naming its line, and does not hide the others.
func TestParse(t *testing.T) {
	devs, errs := Parse(strings.NewReader(sample), "devices.conf")
	want := []Device{
		{Name: "data", Backing: "/dev/disk/by-id/nvme-X-part2", Queues: 2, Depth: 64, Line: 2},
		{Name: "vm", Backing: "/srv/vm.img", IOMode: "user-copy", Line: 3},
	}
	if !reflect.DeepEqual(devs, want) {
		t.Fatalf("devices %+v, want %+v", devs, want)
	}
	wantErrs := []string{
		`devices.conf:5: name "data" is already declared on line 2`,
		`devices.conf:6: backing "relative/path"`,
		`devices.conf:7: unknown key "qeues"`,
		`devices.conf:8: queues=0: want a positive number`,
		`devices.conf:9: want NAME BACKING`,
	}
	if len(errs) != len(wantErrs) {
		t.Fatalf("errors %v, want %d", errs, len(wantErrs))
	}
	for i, err := range errs {
		var le *LineError
		if !errors.As(err, &le) || !strings.HasPrefix(err.Error(), wantErrs[i]) {
			t.Errorf("error %d: %v, want a LineError starting %q", i, err, wantErrs[i])
		}
	}
}

func TestLoadMissingFileDeclaresNothing(t *testing.T) {
	devs, errs := Load(filepath.Join(t.TempDir(), "none.conf"))
	if devs != nil || errs != nil {
		t.Fatalf("missing file: %v, %v", devs, errs)
	}
}

// Add and Remove keep every other line, comments included; a refused
// edit leaves the file as it was.
func TestAddRemoveKeepTheRest(t *testing.T) {
	p := filepath.Join(t.TempDir(), "etc", "devices.conf")
	if err := Add(p, Device{Name: "a", Backing: "/srv/a.img"}); err != nil {
		t.Fatal(err)
	}
	head := "# hand-written comment\n\n"
	data, _ := os.ReadFile(p)
	if err := os.WriteFile(p, append([]byte(head), data...), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := Add(p, Device{Name: "b", Backing: "/dev/disk/by-id/x", Queues: 1, IOMode: "copy"}); err != nil {
		t.Fatal(err)
	}
	if err := Add(p, Device{Name: "a", Backing: "/srv/other.img"}); !errors.Is(err, ErrDeclared) {
		t.Fatalf("Add of a declared name: %v, want ErrDeclared", err)
	}
	if err := Add(p, Device{Name: "c d", Backing: "/srv/c.img"}); err == nil {
		t.Fatal("Add of a name with a blank was accepted")
	}
	want := head + "a /srv/a.img\nb /dev/disk/by-id/x queues=1 io-mode=copy\n"
	if got, _ := os.ReadFile(p); string(got) != want {
		t.Fatalf("after the adds:\n%s\nwant:\n%s", got, want)
	}
	if err := Remove(p, "a"); err != nil {
		t.Fatal(err)
	}
	if err := Remove(p, "a"); !errors.Is(err, ErrNotDeclared) {
		t.Fatalf("Remove of an undeclared name: %v, want ErrNotDeclared", err)
	}
	want = head + "b /dev/disk/by-id/x queues=1 io-mode=copy\n"
	if got, _ := os.ReadFile(p); string(got) != want {
		t.Fatalf("after the remove:\n%s\nwant:\n%s", got, want)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v after the edits, want the file's own 0640", fi.Mode().Perm())
	}
	devs, errs := Load(p)
	if len(errs) != 0 || len(devs) != 1 || devs[0].Name != "b" || devs[0].Line != 3 {
		t.Fatalf("the edited file parses as %+v, %v", devs, errs)
	}
}

// Parse never panics, and every device it returns reads back the same
// from its own line.
func FuzzParse(f *testing.F) {
	f.Add(sample)
	f.Add("x /a queues=1 depth=2 io-mode=auto\n")
	f.Fuzz(func(t *testing.T, text string) {
		devs, _ := Parse(strings.NewReader(text), "f")
		for _, d := range devs {
			again, errs := Parse(strings.NewReader(d.String()), "f")
			d.Line = 1
			if len(errs) != 0 || len(again) != 1 || again[0] != d {
				t.Fatalf("%+v reads back as %+v, %v", d, again, errs)
			}
		}
	})
}
