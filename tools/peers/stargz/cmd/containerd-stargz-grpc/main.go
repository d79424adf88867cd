// containerd-stargz-grpc for lazysnap's comparisons: stargz-snapshotter's own snapshotter
// (service.NewStargzSnapshotterService, its FUSE filesystem, resolver and keychains) served as
// a containerd proxy snapshotter over gRPC. Upstream's main lives in the stargz-snapshotter
// `cmd` module, which the Go module proxy does not serve; this is a minimal main over the
// library of the same release (see scripts/install-peers.sh). Flags and defaults are
// upstream's; not here: the fuse-manager mode, the bbolt metadata store (memory is used) and
// the CRI keychain's image-service proxy.
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

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/containerd/stargz-snapshotter/service/keychain/kubeconfig"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/containerd/stargz-snapshotter/version"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"
)

var (
	address      = flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "address for the snapshotter's GRPC server")
	configPath   = flag.String("config", "/etc/containerd-stargz-grpc/config.toml", "path to the configuration file")
	logLevel     = flag.String("log-level", "info", "set the logging level [trace, debug, info, warn, error, fatal, panic]")
	rootDir      = flag.String("root", "/var/lib/containerd-stargz-grpc", "path to the root directory for this snapshotter")
	printVersion = flag.Bool("version", false, "print the version")
)

func main() {
	flag.Parse()
	if *printVersion {
		fmt.Println("containerd-stargz-grpc", version.Version, version.Revision)
		return
	}
	if err := log.SetLevel(*logLevel); err != nil {
		fmt.Fprintln(os.Stderr, "containerd-stargz-grpc:", err)
		os.Exit(2)
	}
	if err := run(context.Background()); err != nil {
		log.L.WithError(err).Fatal("containerd-stargz-grpc")
	}
}

func run(ctx context.Context) error {
	var config service.Config
	if b, err := os.ReadFile(*configPath); err == nil {
		if err := toml.Unmarshal(b, &config); err != nil {
			return fmt.Errorf("config %s: %w", *configPath, err)
		}
	} else if !os.IsNotExist(err) || *configPath != flag.Lookup("config").DefValue {
		return fmt.Errorf("config: %w", err)
	}

	creds := []resolver.Credential{dockerconfig.NewDockerconfigKeychain(ctx)}
	if config.KubeconfigKeychainConfig.EnableKeychain {
		var opts []kubeconfig.Option
		if p := config.KubeconfigKeychainConfig.KubeconfigPath; p != "" {
			opts = append(opts, kubeconfig.WithKubeconfigPath(p))
		}
		creds = append(creds, kubeconfig.NewKubeconfigKeychain(ctx, opts...))
	}
	if err := os.MkdirAll(filepath.Join(*rootDir, "snapshotter"), 0o700); err != nil {
		return err
	}
	if err := service.Supported(*rootDir); err != nil {
		return fmt.Errorf("snapshotter not supported on %s: %w", *rootDir, err)
	}
	sn, err := service.NewStargzSnapshotterService(ctx, *rootDir, &config, service.WithCredsFuncs(creds...))
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
