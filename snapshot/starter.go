package snapshot

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
)

// helperStarter returns a ublk.Config.Starter that sends START_DEV from
// the helper process command, run with the device number and this
// process's pid as its last arguments (ublk.StartDev).
func helperStarter(command []string) func(ctx context.Context, devID uint32) error {
	return func(ctx context.Context, devID uint32) error {
		args := append(slices.Clone(command[1:]), strconv.FormatUint(uint64(devID), 10), strconv.Itoa(os.Getpid()))
		out, err := exec.CommandContext(ctx, command[0], args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("start ublk device %d from a helper: %w: %s", devID, err, bytes.TrimSpace(out))
		}
		return nil
	}
}
