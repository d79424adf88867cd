// estargz-convert SRC_OCI_LAYOUT DST_OCI_LAYOUT [--chunk-size N]
//
// Converts the image tagged "latest" in the OCI layout SRC (one manifest; layers gzip, zstd or
// plain tar) to eStargz with the real estargz library (github.com/containerd/stargz-snapshotter/
// estargz, Debian golang-github-containerd-stargz-snapshotter-dev) and writes it as the OCI
// layout DST, tagged "latest". Used by scripts/make-estargz-images.sh for the test images.
//
// Every layer goes through estargz.Build with the default options (gzip at BestCompression, no
// prioritized files, so each layer starts with ".no.prefetch.landmark") plus WithChunkSize when
// --chunk-size is given, and is written the way the eStargz tools (containerd's nativeconverter
// in stargz-snapshotter, ctr-remote) write it:
//   - media type application/vnd.oci.image.layer.v1.tar+gzip,
//   - annotations containerd.io/snapshot/stargz/toc.digest = blob.TOCDigest() and
//     io.containers.estargz.uncompressed-size = the size of the decompressed blob,
//   - the config's rootfs.diff_ids replaced by blob.DiffID().
//
// Everything else in the config, manifest and index descriptor (history, platform, the
// org.opencontainers.image.ref.name annotation) is carried over. JSON is written as
// scripts/mkimage.py writes it: compact, keys sorted. DST is built beside itself and renamed
// into place, so a failed run leaves no half layout.
//
// Build (GOPATH mode, Debian's Go sources; as tests/serve.rs builds the conformance suite):
//
//	GO111MODULE=off GOPATH=$TMP:/usr/share/gocode GOFLAGS= go build -o BIN ./tools/estargz-convert
package main

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
)

const (
	tag             = "latest"
	refNameAnnot    = "org.opencontainers.image.ref.name"
	layerGzip       = "application/vnd.oci.image.layer.v1.tar+gzip"
	manifestMediaTy = "application/vnd.oci.image.manifest.v1+json"
)

type obj = map[string]interface{}

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "estargz-convert: "+format+"\n", a...)
	os.Exit(1)
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: estargz-convert SRC_OCI_LAYOUT DST_OCI_LAYOUT [--chunk-size N]")
	os.Exit(2)
}

// canon is mkimage.py's canon(): compact JSON, map keys sorted (encoding/json sorts map keys),
// no HTML escaping, no trailing newline.
func canon(v interface{}) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		die("encoding JSON: %v", err)
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

func readJSON(path string) obj {
	data, err := os.ReadFile(path)
	if err != nil {
		die("%v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber() // sizes and the like come back exactly as written
	var v obj
	if err := dec.Decode(&v); err != nil {
		die("%s: %v", path, err)
	}
	return v
}

func str(o obj, k string) string {
	s, _ := o[k].(string)
	return s
}

// blobPath is the file of a "sha256:<hex>" digest in an OCI layout.
func blobPath(layout, dgst string) string {
	hexPart := strings.TrimPrefix(dgst, "sha256:")
	if hexPart == dgst || len(hexPart) != 64 || strings.ContainsAny(hexPart, "/.") {
		die("unsupported digest %q", dgst)
	}
	return filepath.Join(layout, "blobs", "sha256", hexPart)
}

// writeBlob stores data as a blob of the layout and returns its descriptor fields.
func writeBlob(layout string, data []byte) (string, int64) {
	sum := sha256.Sum256(data)
	dgst := "sha256:" + hex.EncodeToString(sum[:])
	if err := os.WriteFile(blobPath(layout, dgst), data, 0o644); err != nil {
		die("%v", err)
	}
	return dgst, int64(len(data))
}

// countWriter counts the bytes written to it.
type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// convertLayer runs estargz.Build over one layer blob of src and stores the result in dst.
// Returns the new descriptor and diffID.
func convertLayer(src, dst string, desc obj, opts []estargz.Option) (obj, string) {
	f, err := os.Open(blobPath(src, str(desc, "digest")))
	if err != nil {
		die("%v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		die("%v", err)
	}
	blob, err := estargz.Build(io.NewSectionReader(f, 0, st.Size()), opts...)
	if err != nil {
		die("estargz.Build of %s: %v", str(desc, "digest"), err)
	}
	tmp, err := os.CreateTemp(filepath.Join(dst, "blobs", "sha256"), ".layer-*")
	if err != nil {
		die("%v", err)
	}
	// The blob is written to the file, hashed, and decompressed on the side to count its
	// uncompressed size (what nativeconverter puts in the uncompressed-size annotation).
	var sha hash.Hash = sha256.New()
	pr, pw := io.Pipe()
	uncompressed := &countWriter{}
	done := make(chan error, 1)
	go func() {
		zr, err := gzip.NewReader(pr)
		if err == nil {
			_, err = io.Copy(uncompressed, zr)
		}
		pr.CloseWithError(err) // unblock the writer side if decompression failed
		done <- err
	}()
	n, err := io.Copy(io.MultiWriter(tmp, sha, pw), blob)
	if err != nil {
		die("writing the eStargz blob of %s: %v", str(desc, "digest"), err)
	}
	pw.Close()
	if err := <-done; err != nil {
		die("decompressing the eStargz blob of %s: %v", str(desc, "digest"), err)
	}
	if err := blob.Close(); err != nil { // DiffID is valid only after Close
		die("%v", err)
	}
	if err := tmp.Close(); err != nil {
		die("%v", err)
	}
	dgst := "sha256:" + hex.EncodeToString(sha.Sum(nil))
	if err := os.Rename(tmp.Name(), blobPath(dst, dgst)); err != nil {
		die("%v", err)
	}

	nd := obj{}
	for k, v := range desc {
		nd[k] = v
	}
	annots := obj{}
	if a, ok := desc["annotations"].(obj); ok {
		for k, v := range a {
			annots[k] = v
		}
	}
	annots[estargz.TOCJSONDigestAnnotation] = blob.TOCDigest().String()
	annots[estargz.StoreUncompressedSizeAnnotation] = strconv.FormatInt(uncompressed.n, 10)
	nd["annotations"] = annots
	nd["mediaType"] = layerGzip
	nd["digest"] = dgst
	nd["size"] = n
	return nd, blob.DiffID().String()
}

func main() {
	var args []string
	chunkSize := 0
	for i := 1; i < len(os.Args); i++ {
		a := os.Args[i]
		switch {
		case a == "--chunk-size" && i+1 < len(os.Args):
			i++
			a = "--chunk-size=" + os.Args[i]
			fallthrough
		case strings.HasPrefix(a, "--chunk-size="):
			v, err := strconv.Atoi(strings.TrimPrefix(a, "--chunk-size="))
			if err != nil || v <= 0 {
				die("bad --chunk-size %q", a)
			}
			chunkSize = v
		case strings.HasPrefix(a, "-"):
			usage()
		default:
			args = append(args, a)
		}
	}
	if len(args) != 2 {
		usage()
	}
	src, dst := args[0], args[1]
	var opts []estargz.Option
	if chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(chunkSize))
	}

	// The manifest tagged "latest" (the only one the test images have).
	index := readJSON(filepath.Join(src, "index.json"))
	mans, _ := index["manifests"].([]interface{})
	var mdesc obj
	for _, m := range mans {
		d, _ := m.(obj)
		a, _ := d["annotations"].(obj)
		if a != nil && a[refNameAnnot] == tag {
			if mdesc != nil {
				die("%s: more than one manifest tagged %q", src, tag)
			}
			mdesc = d
		}
	}
	if mdesc == nil {
		die("%s: no manifest tagged %q", src, tag)
	}
	if str(mdesc, "mediaType") != manifestMediaTy {
		die("%s: %q is a %s, not an image manifest", src, tag, str(mdesc, "mediaType"))
	}
	manifest := readJSON(blobPath(src, str(mdesc, "digest")))
	cdesc, _ := manifest["config"].(obj)
	if cdesc == nil {
		die("%s: manifest without config", src)
	}
	config := readJSON(blobPath(src, str(cdesc, "digest")))
	layers, _ := manifest["layers"].([]interface{})
	rootfs, _ := config["rootfs"].(obj)
	if rootfs == nil {
		die("%s: config without rootfs", src)
	}
	if ids, _ := rootfs["diff_ids"].([]interface{}); len(ids) != len(layers) {
		die("%s: %d layers but %d diff_ids", src, len(layers), len(ids))
	}

	tmpDst := filepath.Clean(dst) + fmt.Sprintf(".tmp.%d", os.Getpid())
	os.RemoveAll(tmpDst)
	if err := os.MkdirAll(filepath.Join(tmpDst, "blobs", "sha256"), 0o755); err != nil {
		die("%v", err)
	}

	newLayers := make([]interface{}, len(layers))
	diffIDs := make([]interface{}, len(layers))
	for i, l := range layers {
		d, _ := l.(obj)
		if d == nil {
			die("%s: layer %d is not an object", src, i)
		}
		nd, diffID := convertLayer(src, tmpDst, d, opts)
		newLayers[i] = nd
		diffIDs[i] = diffID
		a := nd["annotations"].(obj)
		fmt.Fprintf(os.Stderr, "layer %d: %s (%s) -> %s, %d bytes, uncompressed %s, toc %s\n", i+1,
			str(d, "digest"), str(d, "mediaType"), nd["digest"], nd["size"],
			a[estargz.StoreUncompressedSizeAnnotation], a[estargz.TOCJSONDigestAnnotation])
	}

	rootfs["diff_ids"] = diffIDs
	cd, cs := writeBlob(tmpDst, canon(config))
	ncdesc := obj{}
	for k, v := range cdesc {
		ncdesc[k] = v
	}
	ncdesc["digest"], ncdesc["size"] = cd, cs
	manifest["config"] = ncdesc
	manifest["layers"] = newLayers
	md, ms := writeBlob(tmpDst, canon(manifest))

	nmdesc := obj{}
	for k, v := range mdesc {
		nmdesc[k] = v
	}
	nmdesc["digest"], nmdesc["size"] = md, ms
	index["manifests"] = []interface{}{nmdesc}
	if err := os.WriteFile(filepath.Join(tmpDst, "index.json"), canon(index), 0o644); err != nil {
		die("%v", err)
	}
	if err := os.WriteFile(filepath.Join(tmpDst, "oci-layout"),
		canon(obj{"imageLayoutVersion": "1.0.0"}), 0o644); err != nil {
		die("%v", err)
	}
	if err := os.RemoveAll(dst); err != nil {
		die("%v", err)
	}
	if err := os.Rename(tmpDst, dst); err != nil {
		die("%v", err)
	}
}
