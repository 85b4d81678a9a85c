package daemon

import (
	"reflect"
	"strings"
	"testing"
)

func TestMountPoints(t *testing.T) {
	table := `22 1 259:0 / / rw,relatime shared:1 - ext4 /dev/ublkb0 rw
36 22 259:1 / /mnt/with\040space rw,noatime shared:2 - ext4 /dev/ublkb1 rw
37 22 259:1 /sub /srv/bind rw shared:2 - ext4 /dev/ublkb1 rw
38 22 259:10 / /other rw - ext4 /dev/ublkb10 rw
`
	got, err := mountPoints(strings.NewReader(table), 259, 1)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/mnt/with space", "/srv/bind"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("mountPoints(259:1) = %q, want %q", got, want)
	}
	if got, _ := mountPoints(strings.NewReader(table), 8, 0); len(got) != 0 {
		t.Fatalf("mountPoints(8:0) = %q, want none", got)
	}
}
