package host

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// A mount is named as the caller sees it; one only another table shows
// says whose view its path is in, and a table that cannot be read (a
// caller gone) does not hide the others.
func TestMountsInNamesTheCallersView(t *testing.T) {
	dir := t.TempDir()
	table := func(name string, lines ...string) string {
		p := filepath.Join(dir, name)
		var b []byte
		for _, l := range lines {
			b = append(b, l+"\n"...)
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The device is 259:3; mount 40 is in both tables (one namespace, two
	// roots), mount 41 only in pid 1's, and 30 is another device.
	callerTable := table("caller",
		"30 1 8:1 / / rw - ext4 /dev/sda1 rw",
		"40 30 259:3 / /tmp/ma rw - ext4 /dev/ublkb0 rw")
	initTable := table("init",
		"30 1 8:1 / /host rw - ext4 /dev/sda1 rw",
		"40 30 259:3 / /host/tmp/ma rw - ext4 /dev/ublkb0 rw",
		"41 30 259:3 / /host/srv rw - ext4 /dev/ublkb0 rw")
	tables := []mountTable{
		{filepath.Join(dir, "gone"), "/proc/9/root", ""},
		{callerTable, "/proc/7/root", ""},
		{initTable, "/proc/1/root", "pid 1"},
	}
	got, err := mountsIn(tables, unix.Mkdev(259, 3))
	if err != nil {
		t.Fatal(err)
	}
	want := []mount{
		{path: "/tmp/ma", open: "/proc/7/root/tmp/ma"},
		{path: "/host/srv", open: "/proc/1/root/host/srv", view: "pid 1"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("mounts %+v, want %+v", got, want)
	}
	if s := got[0].String(); s != "/tmp/ma" {
		t.Fatalf("the caller's mount is named %q", s)
	}
	if s := got[1].String(); s != "/host/srv (as pid 1 sees it)" {
		t.Fatalf("pid 1's mount is named %q", s)
	}
}
