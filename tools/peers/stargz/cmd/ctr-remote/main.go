// ctr-remote for lazysnap's comparisons: containerd's ctr (github.com/containerd/containerd/v2/
// cmd/ctr/app) with stargz-snapshotter's two image commands that lazysnap is compared on,
// expressed over stargz-snapshotter's library: `images rpull` (a pull whose layers carry the
// remote-snapshot labels, source.AppendDefaultLabelsHandlerWrapper, unpacked into the stargz
// snapshotter) and `images convert --estargz` (nativeconverter/estargz through containerd's
// converter). Upstream's main lives in the stargz-snapshotter `cmd` module, which the Go module
// proxy does not serve (see scripts/install-peers.sh). Not here: `optimize` (workload-based
// prioritisation), `--zstdchunked`, ipfs and fanotify helpers.
package main

import (
	"context"
	"fmt"
	"os"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/cmd/ctr/app"
	"github.com/containerd/containerd/v2/cmd/ctr/commands"
	"github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/platforms"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/fs/source"
	estargzconvert "github.com/containerd/stargz-snapshotter/nativeconverter/estargz"
	"github.com/containerd/stargz-snapshotter/version"
	"github.com/urfave/cli/v3"
)

func main() {
	root := app.New()
	root.Name = "ctr-remote"
	root.Version = version.Version
	cli.VersionPrinter = func(cmd *cli.Command) {
		fmt.Fprintln(cmd.Root().Writer, cmd.Name, "github.com/containerd/stargz-snapshotter", version.Version, version.Revision)
	}
	for _, c := range root.Commands {
		if c.Name != "images" {
			continue
		}
		subs := []*cli.Command{rpullCommand, convertCommand}
		for _, s := range c.Commands {
			if s.Name != "convert" {
				subs = append(subs, s)
			}
		}
		c.Commands = subs
	}
	if err := root.Run(context.Background(), os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "ctr-remote: %v\n", err)
		os.Exit(1)
	}
}

var rpullCommand = &cli.Command{
	Name:      "rpull",
	Usage:     "pull an image for remote snapshotters (layers labelled for lazy pulling)",
	ArgsUsage: "REF",
	Flags: append(append([]cli.Flag{}, commands.RegistryFlags...),
		&cli.StringFlag{Name: "snapshotter", Value: "stargz", Usage: "snapshotter to unpack into"},
		&cli.Int64Flag{Name: "prefetch-size", Usage: "prefetch size hint passed to the snapshotter (bytes)"},
		&cli.StringFlag{Name: "platform", Usage: "platform to pull (default: this machine's)"},
	),
	Action: func(ctx context.Context, cmd *cli.Command) error {
		ref := cmd.Args().First()
		if ref == "" {
			return fmt.Errorf("please provide an image reference to pull")
		}
		client, ctx, cancel, err := commands.NewClient(ctx, cmd)
		if err != nil {
			return err
		}
		defer cancel()
		ctx, done, err := client.WithLease(ctx)
		if err != nil {
			return err
		}
		defer done(ctx)
		resolver, err := commands.GetResolver(ctx, cmd)
		if err != nil {
			return err
		}
		pm := platforms.Default()
		if p := cmd.String("platform"); p != "" {
			spec, err := platforms.Parse(p)
			if err != nil {
				return err
			}
			pm = platforms.Only(spec)
		}
		fmt.Fprintf(os.Stderr, "fetching %v...\n", ref)
		img, err := client.Pull(ctx, ref,
			containerd.WithResolver(resolver),
			containerd.WithPlatformMatcher(pm),
			containerd.WithPullUnpack,
			containerd.WithPullSnapshotter(cmd.String("snapshotter")),
			containerd.WithImageHandlerWrapper(source.AppendDefaultLabelsHandlerWrapper(ref, cmd.Int64("prefetch-size"))),
		)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "unpacked %s (%s)\n", img.Name(), img.Target().Digest)
		return nil
	},
}

var convertCommand = &cli.Command{
	Name:      "convert",
	Usage:     "convert an image (--estargz: to eStargz layers)",
	ArgsUsage: "[flags] SOURCE_REF TARGET_REF",
	Flags: []cli.Flag{
		&cli.BoolFlag{Name: "estargz", Usage: "convert legacy tar(.gz) layers to eStargz"},
		&cli.BoolFlag{Name: "oci", Usage: "convert Docker media types to OCI media types"},
		&cli.IntFlag{Name: "estargz-compression-level", Value: 9, Usage: "gzip compression level of eStargz layers"},
		&cli.IntFlag{Name: "estargz-chunk-size", Usage: "chunk size of eStargz layers (0: library default)"},
		&cli.IntFlag{Name: "estargz-min-chunk-size", Usage: "minimal chunk size of eStargz layers (0: library default)"},
		&cli.StringSliceFlag{Name: "platform", Usage: "convert only this platform (repeatable; default: all)"},
		&cli.BoolFlag{Name: "all-platforms", Usage: "convert all platforms (the default)"},
	},
	Action: func(ctx context.Context, cmd *cli.Command) error {
		src, dst := cmd.Args().Get(0), cmd.Args().Get(1)
		if src == "" || dst == "" {
			return fmt.Errorf("usage: %s", cmd.ArgsUsage)
		}
		var opts []converter.Opt
		if ps := cmd.StringSlice("platform"); len(ps) > 0 && !cmd.Bool("all-platforms") {
			all, err := platforms.ParseAll(ps)
			if err != nil {
				return err
			}
			opts = append(opts, converter.WithPlatform(platforms.Any(all...)))
		} else {
			opts = append(opts, converter.WithPlatform(platforms.All))
		}
		if cmd.Bool("oci") {
			opts = append(opts, converter.WithDockerToOCI(true))
		}
		if cmd.Bool("estargz") {
			eo := []estargz.Option{estargz.WithCompressionLevel(int(cmd.Int("estargz-compression-level")))}
			if n := cmd.Int("estargz-chunk-size"); n > 0 {
				eo = append(eo, estargz.WithChunkSize(int(n)))
			}
			if n := cmd.Int("estargz-min-chunk-size"); n > 0 {
				eo = append(eo, estargz.WithMinChunkSize(int(n)))
			}
			opts = append(opts, converter.WithLayerConvertFunc(estargzconvert.LayerConvertFunc(eo...)))
		}
		client, ctx, cancel, err := commands.NewClient(ctx, cmd)
		if err != nil {
			return err
		}
		defer cancel()
		img, err := converter.Convert(ctx, client, dst, src, opts...)
		if err != nil {
			return err
		}
		fmt.Println(img.Target.Digest.String())
		return nil
	},
}
