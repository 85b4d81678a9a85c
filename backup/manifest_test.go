package backup

import (
	"encoding/json"
	"testing"
)

// A manifest's extents are {"offset","length","sha256"} on disk, both ways.
func TestManifestExtentJSON(t *testing.T) {
	const extents = `[{"offset":65536,"length":4096,"sha256":"ab"}]`
	var m Manifest
	if err := json.Unmarshal([]byte(`{"extents":`+extents+`}`), &m); err != nil {
		t.Fatal(err)
	}
	if len(m.Extents) != 1 || m.Extents[0].Offset != 65536 || m.Extents[0].Length != 4096 || m.Extents[0].SHA256 != "ab" {
		t.Fatalf("decoded %+v", m.Extents)
	}
	if b, err := json.Marshal(m.Extents); err != nil || string(b) != extents {
		t.Fatalf("encoded %s, %v; want %s", b, err, extents)
	}
}
