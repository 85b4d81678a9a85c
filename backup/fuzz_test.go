package backup

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzManifest: Load never panics on any manifest file, and a manifest it
// accepts holds what Restore relies on: extents in order, on block
// boundaries, inside the device.
func FuzzManifest(f *testing.F) {
	f.Add([]byte(`{"version":1,"device":"d","device_size":1048576,"block_size":65536,"generation":"g","changes":1,"full":true,` +
		`"created":"2026-12-04T00:00:00Z","extents":[{"offset":0,"length":65536},{"offset":131072,"length":917504}]}`))
	f.Add([]byte(`{"version":1,"device_size":1000,"block_size":512,"full":false,"previous":"../a/manifest.json","extents":[{"offset":512,"length":488}]}`))
	f.Add([]byte(`{"version":1,"device_size":4096,"block_size":4096,"full":true,"extents":[{"offset":0,"length":-1}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "manifest.json")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		m, err := Load(p)
		if err != nil {
			return
		}
		end := int64(0)
		for _, e := range m.Extents {
			if e.Offset < end || e.Length <= 0 || e.Offset+e.Length > m.DeviceSize || e.Offset%m.BlockSize != 0 {
				t.Fatalf("accepted extent %+v of a %d-byte device after byte %d", e, m.DeviceSize, end)
			}
			end = e.Offset + e.Length
		}
		if m.Bytes() > m.DeviceSize {
			t.Fatalf("accepted %d bytes of extents on a %d-byte device", m.Bytes(), m.DeviceSize)
		}
	})
}
