package snapshot

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzStateFile: loadState never panics on any state file, refuses a bad
// one with ErrInvalid (the daemon then says to move it away), and a state
// it accepts saves and loads again to the same state.
func FuzzStateFile(f *testing.F) {
	f.Add([]byte(`{"version":1,"devices":[{"ublk_id":3,"name":"a","backing":"/a.img"}],"freezing":["/dev/ublkb3"]}`))
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`{"version":1,"snapshots":[{"id":"x","devices":[1,2]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "state.json")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := loadState(p)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("a bad state file refused with %v, not ErrInvalid", err)
			}
			return
		}
		b, err := json.Marshal(st)
		if err != nil {
			t.Fatalf("an accepted state does not save: %v", err)
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		again, err := loadState(p)
		if err != nil {
			t.Fatalf("an accepted state saved and loaded again: %v", err)
		}
		// (compared as saved: an empty list and none save alike)
		if b2, _ := json.Marshal(again); !bytes.Equal(b2, b) {
			t.Fatalf("an accepted state saved and loaded again: %s; want %s", b2, b)
		}
	})
}
