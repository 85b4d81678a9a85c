// Package atomicfile replaces small files so that a crash at any moment
// leaves either the old content or the new, never a mix: the new content
// goes to PATH.tmp, is synced, renamed over PATH, and the directory is
// synced so that the rename itself is durable.
package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
)

// WriteFile replaces the file at path with data (mode perm if it is
// created). On error the old file, if any, is unchanged and no temporary
// file is left.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	err = errors.Join(err, f.Close())
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SyncDir makes the entries of directory dir durable: renames, creations
// and removals in it.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
