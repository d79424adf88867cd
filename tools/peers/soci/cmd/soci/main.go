// soci for lazysnap's comparisons: the two commands of the SOCI CLI that the comparison needs,
// over the soci-snapshotter library (soci.NewIndexBuilder: Build, Convert), against an image
// already in containerd's content store. Upstream's CLI lives in the soci-snapshotter `cmd`
// module, which the Go module proxy does not serve (see scripts/install-peers.sh).
//
//   - `soci convert SRC DST` (as upstream's, SOCI index manifest v2, the default since 0.10):
//     builds a SOCI index and its zTOCs per platform, annotates each image manifest with its
//     SOCI index's digest (so the image digest changes) and bundles both into a new OCI image
//     index, recorded as image DST in containerd. Pushed like any image (`ctr images push`),
//     it needs no referrers API: the snapshotter finds the index through the annotation.
//   - `soci create IMAGE`: a SOCI index manifest v1 (found through the referrers API; off by
//     default in soci-snapshotter >= 0.10), recorded in the snapshotter's artifacts database.
//
// Not here: push, standalone (OCI layout) conversion, prefetch paths, index/ztoc listing, rebuild-db.
//
//	soci [-a ADDRESS] [-n NAMESPACE] [-root DIR] convert [-min-layer-size N] [-span-size N] [-platform P] SRC DST
//	soci [-a ADDRESS] [-n NAMESPACE] [-root DIR] create [-min-layer-size N] [-span-size N] [-platform P] IMAGE
//	soci --version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/awslabs/soci-snapshotter/config"
	"github.com/awslabs/soci-snapshotter/soci"
	"github.com/awslabs/soci-snapshotter/soci/store"
	"github.com/awslabs/soci-snapshotter/version"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
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
	usage := "usage: soci [-a ADDRESS] [-n NAMESPACE] [-root DIR] convert [flags] SRC DST | create [flags] IMAGE | soci --version"
	if g.NArg() < 1 || (g.Arg(0) != "create" && g.Arg(0) != "convert") {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	verb := g.Arg(0)
	c := flag.NewFlagSet(verb, flag.ExitOnError)
	// Upstream's defaults (cmd/soci/commands/create.go): 10 MiB, 4 MiB.
	minLayer := c.Int64("min-layer-size", 10<<20, "layers smaller than this get no zTOC (fetched whole at pull)")
	span := c.Int64("span-size", 1<<22, "span size of zTOCs")
	platform := c.String("platform", "", "platform (default: this machine's; convert: the image's own when it has one)")
	c.Parse(g.Args()[1:])
	var err error
	switch verb {
	case "create":
		if c.NArg() != 1 {
			fmt.Fprintln(os.Stderr, "soci create: need one IMAGE")
			os.Exit(2)
		}
		err = create(*addr, *ns, *root, c.Arg(0), *platform, *minLayer, *span)
	case "convert":
		if c.NArg() != 2 {
			fmt.Fprintln(os.Stderr, "soci convert: need SRC and DST")
			os.Exit(2)
		}
		err = convert(*addr, *ns, *root, c.Arg(0), c.Arg(1), *platform, *minLayer, *span)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "soci %s: %v\n", verb, err)
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
	db, err := openDB(root)
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

// verifyRef: DST must be a tagged reference without a digest (upstream's rule: the converted
// image is a new image, pushed by name).
func verifyRef(r string) error {
	ref, err := reference.Parse(r)
	if err != nil {
		return fmt.Errorf("destination %q: %w", r, err)
	}
	if ref.Object == "" || strings.Contains(ref.Object, "@") {
		return fmt.Errorf("destination %q must be a tagged ref of the form registry/repository:tag", r)
	}
	return nil
}

// convert does what upstream's `soci convert SRC DST` does (cmd/soci/commands/convert.go of
// v0.16.1): IndexBuilder.Convert inside one containerd lease (BatchOpen), without GC labels on
// the new OCI index (image DST is its GC root), then DST created or pointed at it. Prints the
// new index's digest.
func convert(addr, ns, root, src, dst, platform string, minLayer, span int64) error {
	if err := verifyRef(dst); err != nil {
		return err
	}
	ctx := namespaces.WithNamespace(context.Background(), ns)
	client, err := containerd.New(addr)
	if err != nil {
		return err
	}
	defer client.Close()
	is := client.ImageService()
	srcImg, err := is.Get(ctx, src)
	if err != nil {
		return err
	}
	blobStore, err := store.NewContentStore(store.WithType(store.ContainerdContentStoreType), store.WithContainerdAddress(addr))
	if err != nil {
		return err
	}
	db, err := openDB(root)
	if err != nil {
		return err
	}
	b, err := soci.NewIndexBuilder(client.ContentStore(), blobStore,
		soci.WithArtifactsDb(db), soci.WithMinLayerSize(minLayer), soci.WithSpanSize(span),
		soci.WithBuildToolIdentifier("lazysnap tools/peers/soci "+version.Version))
	if err != nil {
		return err
	}
	batchCtx, done, err := blobStore.BatchOpen(ctx)
	if err != nil {
		return err
	}
	defer done(ctx)
	// No -platform: Convert's own default (the image's platform for a single-manifest image,
	// else this machine's), as upstream without --platform/--all-platforms.
	var opts []soci.ConvertOption
	if platform != "" {
		p, err := platforms.Parse(platform)
		if err != nil {
			return err
		}
		opts = append(opts, soci.ConvertWithPlatforms(p))
	}
	opts = append(opts, soci.ConvertWithNoGarbageCollectionLabels())
	desc, err := b.Convert(batchCtx, srcImg, opts...)
	if err != nil {
		return err
	}
	if err := setImage(ctx, is, dst, *desc); err != nil {
		return err
	}
	fmt.Println(desc.Digest)
	return nil
}

func setImage(ctx context.Context, is images.Store, name string, target ocispec.Descriptor) error {
	img, err := is.Get(ctx, name)
	if err != nil {
		if !errors.Is(err, errdefs.ErrNotFound) {
			return err
		}
		_, err = is.Create(ctx, images.Image{Name: name, Target: target})
		return err
	}
	img.Target = target
	_, err = is.Update(ctx, img)
	return err
}

// openDB opens (creating ROOT if needed) the artifacts database the index builder records in.
func openDB(root string) (*soci.ArtifactsDb, error) {
	if err := os.MkdirAll(root, 0o711); err != nil {
		return nil, err
	}
	return soci.NewDB(soci.ArtifactsDbPath(root))
}
