// rpull pulls an image into containerd the way CRI and nerdctl do (and stargz's
// `ctr-remote images rpull`): containerd's client.Pull with unpack into a snapshotter, layer
// descriptors annotated by snapshotters.AppendInfoHandlerWrapper. containerd then prepares each
// layer's snapshot before fetching it, passing the remote-snapshot labels
// (containerd.io/snapshot.ref, containerd.io/snapshot/cri.image-ref, cri.manifest-digest,
// cri.layer-digest); a snapshotter that answers AlreadyExists (lazysnap, for a layer with a
// lazysnap index artifact) is not sent the layer at all. `ctr images pull` cannot do this on
// containerd 1.6: it fetches every blob before the snapshotter sees a layer.
//
//	rpull [-a ADDRESS] [-n NAMESPACE] [-snapshotter lazysnap] [-plain-http] [-no-labels] REF
//
// ADDRESS defaults to $CONTAINERD_ADDRESS, else /run/containerd/containerd.sock; NAMESPACE to
// $CONTAINERD_NAMESPACE, else "default". Loopback registries are spoken to over plain HTTP
// (as docker and lazysnap do); -plain-http does it for every registry. REF may be short
// (debian:12 is docker.io/library/debian:12).
//
// Built against Debian's containerd 1.6 Go sources in GOPATH mode (no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o rpull ./tools/rpull
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
)

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// normalize makes a docker-style short reference fully qualified, as docker does:
// debian -> docker.io/library/debian:latest, 127.0.0.1:5000/a/b keeps its host.
func normalize(ref string) string {
	name := ref
	if i := strings.IndexAny(name, "@"); i >= 0 {
		name = name[:i]
	}
	first := name
	if i := strings.Index(name, "/"); i >= 0 {
		first = name[:i]
	}
	hasHost := strings.Contains(name, "/") &&
		(strings.ContainsAny(first, ".:") || first == "localhost")
	if !hasHost {
		if !strings.Contains(ref, "/") {
			ref = "library/" + ref
		}
		ref = "docker.io/" + ref
	}
	// A tag is a ':' after the last '/', outside a digest.
	name = ref
	if i := strings.Index(name, "@"); i >= 0 {
		return ref
	}
	if !strings.Contains(name[strings.LastIndex(name, "/")+1:], ":") {
		ref += ":latest"
	}
	return ref
}

func main() {
	address := flag.String("a", env("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"), "containerd's socket")
	namespace := flag.String("n", env("CONTAINERD_NAMESPACE", "default"), "containerd namespace")
	snapshotter := flag.String("snapshotter", env("CONTAINERD_SNAPSHOTTER", "lazysnap"), "snapshotter to unpack into")
	plainHTTP := flag.Bool("plain-http", false, "plain HTTP for every registry (loopback registries use it anyway)")
	noLabels := flag.Bool("no-labels", false, "leave out the cri.* labels (containerd then fetches every layer)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s [flags] REF\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	ref := normalize(flag.Arg(0))

	client, err := containerd.New(*address)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rpull: connecting to containerd at %s: %v\n", *address, err)
		os.Exit(1)
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), *namespace)
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rpull: lease: %v\n", err)
		os.Exit(1)
	}
	defer done(ctx)

	plain := docker.MatchLocalhost
	if *plainHTTP {
		plain = docker.MatchAllHosts
	}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(plain)),
	})
	opts := []containerd.RemoteOpt{
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(*snapshotter),
	}
	if !*noLabels {
		opts = append(opts, containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)))
	}
	start := time.Now()
	img, err := client.Pull(ctx, ref, opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rpull: pulling %s: %v\n", ref, err)
		os.Exit(1)
	}
	fmt.Printf("pulled %s (%s) into snapshotter %s in %.3fs\n", img.Name(), img.Target().Digest,
		*snapshotter, time.Since(start).Seconds())
}
