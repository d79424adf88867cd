// soci for lazysnap's comparisons: the one command of the SOCI CLI that the comparison needs,
// `soci create IMAGE` (build a SOCI v1 index and its zTOCs for an image already in containerd's
// content store, and record them in the snapshotter's artifacts database), over the
// soci-snapshotter library (soci.NewIndexBuilder / Build). Upstream's CLI lives in the
// soci-snapshotter `cmd` module, which the Go module proxy does not serve (see
// scripts/install-peers.sh). Not here: convert, push, index/ztoc listing, rebuild-db.
//
//	soci [-a ADDRESS] [-n NAMESPACE] create [-min-layer-size N] [-span-size N] [-platform P] IMAGE
//	soci --version
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/awslabs/soci-snapshotter/config"
	"github.com/awslabs/soci-snapshotter/soci"
	"github.com/awslabs/soci-snapshotter/soci/store"
	"github.com/awslabs/soci-snapshotter/version"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"
)

func main() {
	g := flag.NewFlagSet("soci", flag.ExitOnError)
	addr := g.String("a", envOr("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"), "containerd address")
	ns := g.String("n", envOr("CONTAINERD_NAMESPACE", "default"), "containerd namespace")
	root := g.String("root", config.DefaultSociSnapshotterRootPath, "soci-snapshotter-grpc root (artifacts db)")
	ver := g.Bool("version", false, "print the version")
	g.Parse(os.Args[1:])
	if *ver {
		fmt.Println("soci version", version.Version, version.Revision)
		return
	}
	if g.NArg() < 1 || g.Arg(0) != "create" {
		fmt.Fprintln(os.Stderr, "usage: soci [-a ADDRESS] [-n NAMESPACE] create [flags] IMAGE | soci --version")
		os.Exit(2)
	}
	c := flag.NewFlagSet("create", flag.ExitOnError)
	minLayer := c.Int64("min-layer-size", 10<<20, "layers smaller than this get no zTOC")
	span := c.Int64("span-size", 1<<22, "span size of zTOCs")
	platform := c.String("platform", "", "platform (default: this machine's)")
	c.Parse(g.Args()[1:])
	if c.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "soci create: need one IMAGE")
		os.Exit(2)
	}
	if err := create(*addr, *ns, *root, c.Arg(0), *platform, *minLayer, *span); err != nil {
		fmt.Fprintln(os.Stderr, "soci create:", err)
		os.Exit(1)
	}
}

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func create(addr, ns, root, ref, platform string, minLayer, span int64) error {
	ctx := namespaces.WithNamespace(context.Background(), ns)
	client, err := containerd.New(addr)
	if err != nil {
		return err
	}
	defer client.Close()
	img, err := client.ImageService().Get(ctx, ref)
	if err != nil {
		return err
	}
	p := platforms.DefaultSpec()
	if platform != "" {
		if p, err = platforms.Parse(platform); err != nil {
			return err
		}
	}
	blobStore, err := store.NewContentStore(store.WithType(store.ContainerdContentStoreType), store.WithContainerdAddress(addr))
	if err != nil {
		return err
	}
	db, err := soci.NewDB(soci.ArtifactsDbPath(root))
	if err != nil {
		return err
	}
	b, err := soci.NewIndexBuilder(client.ContentStore(), blobStore,
		soci.WithArtifactsDb(db), soci.WithMinLayerSize(minLayer), soci.WithSpanSize(span),
		soci.WithBuildToolIdentifier("lazysnap tools/peers/soci "+version.Version))
	if err != nil {
		return err
	}
	idx, err := b.Build(ctx, img, soci.WithPlatform(p))
	if err != nil {
		return err
	}
	fmt.Println(idx.Desc.Digest)
	return nil
}
