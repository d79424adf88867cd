// zstd-klauspost compresses stdin to stdout with github.com/klauspost/compress/zstd, the Go
// encoder buildkit, containerd and nerdctl write zstd layers with, at its default settings
// (SpeedDefault, 8 MiB window, one frame) unless -level or -window say otherwise. The zstd
// tests use it to check resume points on layers made by that encoder.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"
)

func main() {
	level := flag.Int("level", int(zstd.SpeedDefault), "encoder level: 1 fastest, 2 default, 3 better, 4 best")
	window := flag.Int("window", 0, "window size in bytes (0: the encoder's default)")
	crc := flag.Bool("crc", true, "write a content checksum")
	flag.Parse()
	opts := []zstd.EOption{zstd.WithEncoderLevel(zstd.EncoderLevel(*level)), zstd.WithEncoderCRC(*crc)}
	if *window > 0 {
		opts = append(opts, zstd.WithWindowSize(*window))
	}
	enc, err := zstd.NewWriter(os.Stdout, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "zstd-klauspost:", err)
		os.Exit(1)
	}
	if _, err := io.Copy(enc, os.Stdin); err != nil {
		fmt.Fprintln(os.Stderr, "zstd-klauspost:", err)
		os.Exit(1)
	}
	if err := enc.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "zstd-klauspost:", err)
		os.Exit(1)
	}
}
