package daemon

import (
	"cmp"
	"context"
	"log/slog"

	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/snapshot"
)

// exportMembers describes images as export members, each named
// names[device], or its image's name when names has none.
func exportMembers(images []*snapshot.ImageReader, names map[string]string) []export.Member {
	members := make([]export.Member, len(images))
	for i, img := range images {
		members[i] = export.Member{Name: cmp.Or(names[img.Device], img.Name), Device: img.Device, Size: img.Size, Image: img}
	}
	return members
}

// ResumeExports starts again the exports an earlier daemon saved before a
// planned restart (export.Saved), each with the members it had. One whose
// snapshot did not survive, or that cannot listen again, is logged and
// left out.
func ResumeExports(svc Service, exports *export.Exports, saved []export.Saved, log *slog.Logger) {
	for _, sv := range saved {
		images, err := svc.OpenImages(sv.Snapshot, "")
		var kept []*snapshot.ImageReader
		for _, img := range images {
			if _, ok := sv.Names[img.Device]; ok {
				kept = append(kept, img)
			}
		}
		if err == nil {
			_, err = exports.Start(context.Background(), sv.Snapshot, exportMembers(kept, sv.Names), sv.Options)
		}
		if err != nil {
			log.Error("export of the earlier daemon not started again", "listen", sv.Options.Listen, "snapshot", sv.Snapshot, "err", err)
		}
	}
}
