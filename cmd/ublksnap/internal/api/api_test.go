package api

import (
	"encoding/json"
	"testing"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/storage"
)

// The requests that carry runs of sectors and bytes keep their JSON keys:
// {"start","count"} and {"offset","length"}.
func TestRunsOnTheWire(t *testing.T) {
	for _, c := range []struct {
		req  any
		want string
	}{
		{AppendStorageRequest{Path: "/x", Ranges: []storage.Range{{Start: 8, Count: 16}}}, `{"path":"/x","ranges":[{"start":8,"count":16}]}`},
		{AppendStorageRequest{Path: "/x"}, `{"path":"/x"}`},
		{MarkDirtyRequest{Device: "d", Ranges: []cbt.Extent{{Offset: 4096, Length: 512}}}, `{"device":"d","ranges":[{"offset":4096,"length":512}]}`},
	} {
		if b, err := json.Marshal(c.req); err != nil || string(b) != c.want {
			t.Errorf("%+v: %s, %v; want %s", c.req, b, err, c.want)
		}
	}
}
