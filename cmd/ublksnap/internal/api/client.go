package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"syscall"
	"time"
)

// ErrNoDaemon is returned when nothing listens on the socket.
var ErrNoDaemon = errors.New("no ublksnap daemon is running")

// Client talks to a daemon over its unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// SocketPath returns the socket to use: flag if set, else $UBLKSNAP_SOCKET,
// else DefaultSocket.
func SocketPath(flag string) string {
	if flag != "" {
		return flag
	}
	if env := os.Getenv(SocketEnv); env != "" {
		return env
	}
	return DefaultSocket
}

// NewClient returns a client for the daemon listening on socket.
func NewClient(socket string) *Client {
	return &Client{
		socket: socket,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		}},
	}
}

// do sends a request with an optional JSON body and decodes the answer into out.
func (c *Client) do(ctx context.Context, method, path string, query url.Values, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	u := "http://ublksnap" + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("%w on %s (start it with `ublksnap daemon`)", ErrNoDaemon, c.socket)
		}
		return fmt.Errorf("talk to daemon on %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		apiErr := &Error{Status: resp.StatusCode}
		if err := json.NewDecoder(resp.Body).Decode(apiErr); err != nil || apiErr.Message == "" {
			apiErr.Message = fmt.Sprintf("daemon answered %s", resp.Status)
		}
		return apiErr
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode daemon answer to %s %s: %w", method, path, err)
	}
	return nil
}

// Status returns the daemon's whole state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, nil, &s)
	return s, err
}

// Attach presents a backing file or block device as a filtered device.
func (c *Client) Attach(ctx context.Context, req AttachRequest) (Device, error) {
	var d Device
	err := c.do(ctx, http.MethodPost, "/v1/devices", nil, req, &d)
	return d, err
}

// Detach stops and removes a filtered device; without force it refuses
// while the device is open or mounted.
func (c *Client) Detach(ctx context.Context, device string, force bool) error {
	q := url.Values{"device": {device}, "force": {strconv.FormatBool(force)}}
	return c.do(ctx, http.MethodDelete, "/v1/devices", q, nil, nil)
}

// Shutdown stops the daemon for good.
func (c *Client) Shutdown(ctx context.Context, force bool) error {
	return c.do(ctx, http.MethodPost, "/v1/shutdown", url.Values{"force": {strconv.FormatBool(force)}}, nil, nil)
}

// Snapshots lists the snapshot UUIDs.
func (c *Client) Snapshots(ctx context.Context) ([]string, error) {
	var ids []string
	err := c.do(ctx, http.MethodGet, "/v1/snapshots", nil, nil, &ids)
	return ids, err
}

// CreateSnapshot creates a snapshot and returns it.
func (c *Client) CreateSnapshot(ctx context.Context, req CreateSnapshotRequest) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodPost, "/v1/snapshots", nil, req, &s)
	return s, err
}

// Snapshot returns one snapshot.
func (c *Client) Snapshot(ctx context.Context, id string) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodGet, "/v1/snapshots/"+url.PathEscape(id), nil, nil, &s)
	return s, err
}

// AddDevice adds a filtered device to a snapshot.
func (c *Client) AddDevice(ctx context.Context, id, device string) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodPost, "/v1/snapshots/"+url.PathEscape(id)+"/devices", nil, AddDeviceRequest{Device: device}, &s)
	return s, err
}

// AppendStorage adds space to a snapshot's difference storage.
func (c *Client) AppendStorage(ctx context.Context, id string, req AppendStorageRequest) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodPost, "/v1/snapshots/"+url.PathEscape(id)+"/storage", nil, req, &s)
	return s, err
}

// Take takes the snapshot: all members switch to COW at one instant.
func (c *Client) Take(ctx context.Context, id string) (Snapshot, error) {
	var s Snapshot
	err := c.do(ctx, http.MethodPost, "/v1/snapshots/"+url.PathEscape(id)+"/take", nil, nil, &s)
	return s, err
}

// WaitEvent waits up to timeout for the snapshot's next event; the wire
// carries it in whole milliseconds (timeout_ms).
func (c *Client) WaitEvent(ctx context.Context, id string, timeout time.Duration) (Event, error) {
	var e Event
	q := url.Values{"timeout_ms": {strconv.FormatInt(timeout.Milliseconds(), 10)}}
	err := c.do(ctx, http.MethodGet, "/v1/snapshots/"+url.PathEscape(id)+"/event", q, nil, &e)
	return e, err
}

// Destroy removes the snapshot's images and releases its storage. Without
// force it refuses while an image is open.
func (c *Client) Destroy(ctx context.Context, id string, force bool) error {
	q := url.Values{"force": {strconv.FormatBool(force)}}
	return c.do(ctx, http.MethodDelete, "/v1/snapshots/"+url.PathEscape(id), q, nil, nil)
}

// SnapshotInfo reports the snapshot state of a filtered device.
func (c *Client) SnapshotInfo(ctx context.Context, device string) (SnapshotInfo, error) {
	var i SnapshotInfo
	err := c.do(ctx, http.MethodGet, "/v1/snapshot-info", url.Values{"device": {device}}, nil, &i)
	return i, err
}

// CBTInfo returns the change tracking state of a device.
func (c *Client) CBTInfo(ctx context.Context, device string) (CBTInfo, error) {
	var i CBTInfo
	err := c.do(ctx, http.MethodGet, "/v1/cbt", url.Values{"device": {device}}, nil, &i)
	return i, err
}

// CBTMap returns the read map of a device.
func (c *Client) CBTMap(ctx context.Context, device string) (CBTMap, error) {
	var m CBTMap
	err := c.do(ctx, http.MethodGet, "/v1/cbt/map", url.Values{"device": {device}}, nil, &m)
	return m, err
}

// MarkDirty marks byte ranges of a device changed.
func (c *Client) MarkDirty(ctx context.Context, req MarkDirtyRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/cbt/dirty", nil, req, nil)
}

// StartExport starts an NBD export.
func (c *Client) StartExport(ctx context.Context, req ExportRequest) (Export, error) {
	var e Export
	err := c.do(ctx, http.MethodPost, "/v1/exports", nil, req, &e)
	return e, err
}

// Exports lists the running NBD exports.
func (c *Client) Exports(ctx context.Context) ([]Export, error) {
	var e []Export
	err := c.do(ctx, http.MethodGet, "/v1/exports", nil, nil, &e)
	return e, err
}

// StopExport ends the NBD export on listen.
func (c *Client) StopExport(ctx context.Context, listen string) error {
	return c.do(ctx, http.MethodDelete, "/v1/exports", url.Values{"listen": {listen}}, nil, nil)
}
