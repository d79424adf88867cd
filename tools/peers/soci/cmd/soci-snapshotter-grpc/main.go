// soci-snapshotter-grpc for lazysnap's comparisons: the SOCI snapshotter
// (service.NewSociSnapshotterService: its FUSE filesystem, ztoc-backed lazy loading, resolver)
// served as a containerd proxy snapshotter over gRPC. Upstream's main lives in the
// soci-snapshotter `cmd` module, which the Go module proxy does not serve; this is a minimal
// main over the library of the same release (see scripts/install-peers.sh). Flags and
// defaults are upstream's, and so is the metadata store (config `metadata_store`: "db", one
// bbolt database under the root, or "db-multi", one per layer), which the filesystem needs to
// mount a layer from its zTOC; not here: metrics/debug listeners, the CRI keychain, systemd
// socket activation. As upstream's (and containerd's own server), the namespace of a request
// (incoming gRPC metadata) is made the outgoing one too, so the snapshotter's own calls back into
// containerd (an image's manifest, for a layer without zTOC) name it.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/awslabs/soci-snapshotter/config"
	socifs "github.com/awslabs/soci-snapshotter/fs"
	"github.com/awslabs/soci-snapshotter/metadata"
	"github.com/awslabs/soci-snapshotter/service"
	"github.com/awslabs/soci-snapshotter/service/keychain/dockerconfig"
	"github.com/awslabs/soci-snapshotter/service/resolver"
	"github.com/awslabs/soci-snapshotter/version"
	"github.com/awslabs/soci-snapshotter/ztoc"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
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
	mt, err := metadataStore(*rootDir, cfg)
	if err != nil {
		return fmt.Errorf("metadata store: %w", err)
	}
	sn, err := service.NewSociSnapshotterService(ctx, *rootDir, &cfg.ServiceConfig, service.WithCredsFuncs(creds...),
		service.WithFilesystemOptions(socifs.WithMetadataStore(mt)))
	if err != nil {
		return err
	}
	defer sn.Close()

	rpc := grpc.NewServer(grpc.UnaryInterceptor(unaryNamespace), grpc.StreamInterceptor(streamNamespace))
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

// metadataStore: where the filesystem keeps a layer's file metadata (built from its zTOC), as
// upstream's main chooses it from the config: "db" (the default) one bbolt database
// ROOT/metadata.db shared by all layers, "db-multi" one database per layer under ROOT/metadata.
// metadata_db_no_sync and metadata_insertion_chunk_size apply to both.
func metadataStore(root string, cfg *config.Config) (metadata.Store, error) {
	bopts := &bolt.Options{NoFreelistSync: true, NoSync: cfg.MetadataDBNoSync}
	withChunk := func(opts []metadata.Option) []metadata.Option {
		if cfg.MetadataInsertionChunkSize > 0 {
			return append([]metadata.Option{metadata.WithInsertionChunkSize(cfg.MetadataInsertionChunkSize)}, opts...)
		}
		return opts
	}
	switch cfg.MetadataStore {
	case "", "db":
		db, err := bolt.Open(filepath.Join(root, "metadata.db"), 0o600, bopts)
		if err != nil {
			return nil, err
		}
		return func(sr *io.SectionReader, toc ztoc.TOC, opts ...metadata.Option) (metadata.Reader, error) {
			return metadata.NewReader(db, sr, toc, withChunk(opts)...)
		}, nil
	case "db-multi":
		multi := metadata.NewMultiReader(filepath.Join(root, "metadata"), metadata.DBMultiOptions{BoltOptions: bopts})
		return func(sr *io.SectionReader, toc ztoc.TOC, opts ...metadata.Option) (metadata.Reader, error) {
			return multi(sr, toc, withChunk(opts)...)
		}, nil
	default:
		return nil, fmt.Errorf("unknown metadata_store %q (db, db-multi)", cfg.MetadataStore)
	}
}

func unaryNamespace(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if ns, ok := namespaces.Namespace(ctx); ok {
		ctx = namespaces.WithNamespace(ctx, ns)
	}
	return h(ctx, req)
}

func streamNamespace(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if ns, ok := namespaces.Namespace(ss.Context()); ok {
		ss = nsStream{ServerStream: ss, ctx: namespaces.WithNamespace(ss.Context(), ns)}
	}
	return h(srv, ss)
}

type nsStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s nsStream) Context() context.Context { return s.ctx }
