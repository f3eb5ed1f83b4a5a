// containerd's own snapshotter conformance suite (snapshots/testsuite, containerd 1.6 as
// Debian ships it) run against `thinpool snapshotter serve` through containerd's proxy
// snapshotter client - the same client containerd uses for a proxy plugin.
//
// Built by tests/containerd/build-suite.sh (GOPATH mode, offline, from Debian's -dev
// packages). Every sub-test gets a fresh snapshotter process on its own root:
//
//	THINPOOL_SNAPSHOTTER  the command that starts thinpool, split on spaces
//	                      (e.g. "/repo/.venv/bin/python -m thinpool.cli")
//	THINPOOL_DRIVER       devicemapper, overlay2 or vfs
//	THINPOOL_STORAGE_OPTS storage options separated by ";" (optional)
package thinpoolsuite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/native"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	command := strings.Fields(os.Getenv("THINPOOL_SNAPSHOTTER"))
	if len(command) == 0 {
		return nil, nil, fmt.Errorf("THINPOOL_SNAPSHOTTER is not set")
	}
	sock := filepath.Join(root, "s.sock")
	logPath := filepath.Join(filepath.Dir(root), "snapshotter.log")
	args := append(command[1:], "snapshotter", "serve", "--verbose", "--socket", sock,
		"--root", filepath.Join(root, "r"), "--driver", os.Getenv("THINPOOL_DRIVER"))
	for _, opt := range strings.Split(os.Getenv("THINPOOL_STORAGE_OPTS"), ";") {
		if opt != "" {
			args = append(args, "--storage-opt", opt)
		}
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(command[0], args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logFile.Close() }()
	logTail := func() string {
		b, _ := os.ReadFile(logPath)
		if len(b) > 4000 {
			b = b[len(b)-4000:]
		}
		return string(b)
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			return nil, nil, fmt.Errorf("the snapshotter exited (%v) before serving:\n%s", err, logTail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, nil, fmt.Errorf("the snapshotter did not listen on %s within 120 s:\n%s", sock, logTail())
		}
	}
	conn, err := grpc.Dial(sock, grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		cmd.Process.Kill()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinpool")
	cleanup := func() error {
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				return fmt.Errorf("the snapshotter stopped with %v:\n%s", err, logTail())
			}
			return nil
		case <-time.After(120 * time.Second):
			cmd.Process.Signal(syscall.SIGUSR1) // thinpool dumps its threads' stacks
			time.Sleep(2 * time.Second)
			cmd.Process.Kill()
			return fmt.Errorf("the snapshotter did not stop within 120 s:\n%s", logTail())
		}
	}
	return sn, cleanup, nil
}

func TestThinpoolSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the suite mounts what the snapshotter returns: it needs root")
	}
	testsuite.SnapshotterSuite(t, "thinpool-"+os.Getenv("THINPOOL_DRIVER"), newSnapshotter)
}

// TestReferenceSnapshotter runs the same suite against one of containerd's own in-process
// snapshotters (THINPOOL_REFERENCE=native or overlayfs), for reference figures.
func TestReferenceSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the suite mounts what the snapshotter returns: it needs root")
	}
	switch os.Getenv("THINPOOL_REFERENCE") {
	case "native":
		testsuite.SnapshotterSuite(t, "native", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
			sn, err := native.NewSnapshotter(root)
			if err != nil {
				return nil, nil, err
			}
			return sn, sn.Close, nil
		})
	case "overlayfs":
		testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
			sn, err := overlay.NewSnapshotter(root)
			if err != nil {
				return nil, nil, err
			}
			return sn, sn.Close, nil
		})
	default:
		t.Skip("THINPOOL_REFERENCE is not native or overlayfs")
	}
}
