// soci-snapshotter-grpc for lazysnap's comparisons: the SOCI snapshotter
// (service.NewSociSnapshotterService: its FUSE filesystem, ztoc-backed lazy loading, resolver)
// served as a containerd proxy snapshotter over gRPC. Upstream's main lives in the
// soci-snapshotter `cmd` module, which the Go module proxy does not serve; this is a minimal
// main over the library of the same release (see scripts/install-peers.sh). Flags and
// defaults are upstream's; not here: metrics/debug listeners, the CRI keychain, systemd
// socket activation.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/awslabs/soci-snapshotter/config"
	"github.com/awslabs/soci-snapshotter/service"
	"github.com/awslabs/soci-snapshotter/service/keychain/dockerconfig"
	"github.com/awslabs/soci-snapshotter/service/resolver"
	"github.com/awslabs/soci-snapshotter/version"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"google.golang.org/grpc"
)

var (
	address      = flag.String("address", "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock", "address for the snapshotter's GRPC server")
	configPath   = flag.String("config", config.DefaultConfigPath, "path to the configuration file")
	logLevel     = flag.String("log-level", "info", "set the logging level [trace, debug, info, warn, error, fatal, panic]")
	rootDir      = flag.String("root", config.DefaultSociSnapshotterRootPath, "path to the root directory for this snapshotter")
	printVersion = flag.Bool("version", false, "print the version")
)

func main() {
	flag.Parse()
	if *printVersion {
		fmt.Println("soci-snapshotter-grpc", version.Version, version.Revision)
		return
	}
	if err := log.SetLevel(*logLevel); err != nil {
		fmt.Fprintln(os.Stderr, "soci-snapshotter-grpc:", err)
		os.Exit(2)
	}
	if err := run(context.Background()); err != nil {
		log.L.WithError(err).Fatal("soci-snapshotter-grpc")
	}
}

func run(ctx context.Context) error {
	cfg, err := config.NewConfigFromToml(*configPath)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*rootDir, 0o711); err != nil {
		return err
	}
	creds := []resolver.Credential{dockerconfig.NewDockerConfigKeychain(ctx)}
	sn, err := service.NewSociSnapshotterService(ctx, *rootDir, &cfg.ServiceConfig, service.WithCredsFuncs(creds...))
	if err != nil {
		return err
	}
	defer sn.Close()

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		return err
	}
	if err := os.Remove(*address); err != nil && !os.IsNotExist(err) {
		return err
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", *address).Info("serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v, shutting down", s)
		rpc.GracefulStop()
		return nil
	case err := <-errc:
		return err
	}
}
