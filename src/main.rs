//! The `lazysnap` command line: a thin layer over the library.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use lazysnap::image::resolve::IngestProgress;
use lazysnap::image::Platform;
use lazysnap::import::{self, Reporter};
use lazysnap::mount::DaemonMounter;
use lazysnap::root::{default_root, Root};
use lazysnap::snapshot::Snapshotter;
use lazysnap::unpack::UnpackProgress;
use lazysnap_fuse::Owners;

#[derive(Parser)]
#[command(
    name = "lazysnap",
    version,
    about = "Mount container images lazily, without extracting them"
)]
struct Cli {
    /// State directory [default: $LAZYSNAP_ROOT, /var/lib/lazysnap as root, else $XDG_DATA_HOME/lazysnap]
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Who holds an active snapshot's writes: `overlay` (the kernel's overlayfs over a shared
    /// read-only lazysnap mount of the chain), `fuse` (lazysnap's FUSE mount serves the upper
    /// too), or `auto`: overlay as root or in a user namespace (kernel >= 5.11), else fuse
    #[arg(long, global = true, default_value = "auto", env = "LAZYSNAP_UPPER",
          value_parser = ["auto", "overlay", "fuse"])]
    upper: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Create an active (writable) snapshot on a committed parent and mount it; prints its mounts
    Prepare {
        key: String,
        #[arg(default_value = "")]
        parent: String,
        /// label KEY=VALUE (repeatable)
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Create a read-only view of a committed parent; prints its mounts
    View {
        key: String,
        parent: String,
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Commit active KEY as committed NAME (a new layer)
    Commit {
        name: String,
        key: String,
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "zstd", value_parser = ["zstd", "gzip", "none"])]
        compression: String,
    },
    /// Remove a snapshot (fails while it has children)
    Rm { keys: Vec<String> },
    /// Info of a snapshot, as JSON
    Stat { key: String },
    /// List snapshots (containerd filters: name==x, parent==x, kind==active, labels."k"==v)
    Ls {
        #[arg(long = "filter")]
        filters: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Mounts of an active snapshot, as JSON
    Mounts { key: String },
    /// Size and inodes of a snapshot's own changes
    Usage { key: String },
    /// Set labels KEY=VALUE (KEY= removes one)
    Label { key: String, labels: Vec<String> },
    /// Apply a layer blob to active KEY by indexing it (what the diff service does for containerd)
    Apply {
        key: String,
        blob: PathBuf,
        #[arg(long, default_value = "application/vnd.oci.image.layer.v1.tar+gzip")]
        media_type: String,
    },
    /// Remove leftovers of interrupted operations
    Cleanup,
}

/// Limits on what a layer may expand to when indexed.
#[derive(clap::Args)]
struct LimitArgs {
    /// Largest uncompressed layer accepted (e.g. 64G); bigger layers fail the import
    #[arg(long, default_value = "256G", value_parser = lazysnap::mount::parse_size)]
    max_layer_size: u64,
    /// Most uncompressed bytes per compressed byte once a layer passes 1 GiB (0: no limit)
    #[arg(long, default_value_t = lazysnap::unpack::DEFAULT_MAX_RATIO)]
    max_layer_ratio: u64,
}

impl From<LimitArgs> for lazysnap::unpack::Limits {
    fn from(a: LimitArgs) -> Self {
        lazysnap::unpack::Limits {
            max_layer_size: a.max_layer_size,
            max_ratio: a.max_layer_ratio,
        }
    }
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Push the index artifact of a local image (pulled or pushed) to the registry, attached
    /// to the image's manifest (OCI referrers), so `pull --lazy` there needs no download
    Push {
        /// [REGISTRY/]REPOSITORY[:TAG] of the image on the registry
        reference: String,
        /// The local image [default: the normalised reference, as `pull` names it]
        #[arg(long)]
        name: Option<String>,
        /// Plain HTTP for every registry (loopback registries use it anyway)
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Import an OCI layout directory, OCI archive or `docker save` archive, and index its layers
    Import {
        path: PathBuf,
        /// Name of the image (when the source holds one image)
        #[arg(long)]
        name: Option<String>,
        /// Platform to pick from a multi-platform image: OS/ARCH[/VARIANT] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Pull an image from a registry (OCI distribution API) and index its layers, as `import`
    Pull {
        /// [REGISTRY/]REPOSITORY[:TAG][@DIGEST] (short names are on docker.io)
        reference: String,
        /// Name of the image [default: the normalised reference]
        #[arg(long)]
        name: Option<String>,
        /// Platform to pick from a multi-platform image: OS/ARCH[/VARIANT] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
        /// A mirror tried before the registry (HOST[:PORT] or http(s)://HOST[:PORT]; repeatable)
        #[arg(long = "mirror")]
        mirrors: Vec<String>,
        /// Plain HTTP for every registry (loopback registries use it anyway)
        #[arg(long)]
        insecure: bool,
        /// Leave layers that have a lazysnap index artifact (`index push`) in the registry:
        /// mounts read them by range on demand (and download them in the background)
        #[arg(long)]
        lazy: bool,
        /// With --lazy: never download whole layers; only the ranges reads need
        #[arg(long, requires = "lazy")]
        no_background_fetch: bool,
        /// With --lazy: fetch what the image's access traces name before returning (by
        /// default the first mount fetches it, first thing)
        #[arg(long, requires = "lazy")]
        prefetch: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Index artifacts: what lets other nodes pull an image lazily
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Show the access trace recorded for an image's lazily pulled layers (files in the order
    /// the first mount read them), which later mounts fetch first
    Trace {
        name: String,
        /// Forget the traces, so the next mount records new ones
        #[arg(long)]
        reset: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Push an image (imported, pulled or committed) to a registry
    Push {
        name: String,
        /// [REGISTRY/]REPOSITORY[:TAG]
        reference: String,
        /// Plain HTTP for every registry (loopback registries use it anyway)
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        out: OutCompression,
    },
    /// Index an imported image's layers again (what import does after copying blobs)
    Unpack {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List images
    Images {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show an image as containerd's Image interface sees it, as JSON
    Inspect { name: String },
    /// Remove an image, and the blobs and indexes nothing else needs
    Rmi { names: Vec<String> },
    /// Remove blobs, indexes and snapshots nothing references
    Gc,
    /// Mount an image's root filesystem read-only at DIR, lazily (nothing is extracted)
    Mount {
        /// Image name (or the key of a committed snapshot)
        image: String,
        dir: PathBuf,
        /// Serve in this process until unmounted or interrupted
        #[arg(long)]
        foreground: bool,
        /// Memory for decompressed spans (e.g. 64M, 1G; at least a randomly read file's size)
        #[arg(long, default_value = lazysnap::mount::DEFAULT_CACHE_SIZE, value_parser = lazysnap::mount::parse_size)]
        cache_size: u64,
        /// FUSE worker threads [default: 2 x cores, 4..16]
        #[arg(long)]
        threads: Option<usize>,
        /// Writable: prepare an active snapshot on the image and mount it (see `commit`)
        #[arg(long)]
        rw: bool,
        /// Whose ids files show: `image` (as recorded in the layers; inside a user namespace
        /// mapped through its uid/gid maps) or `caller` (every file yours, and you act as the
        /// image's root: what you create or chown to yourself is committed as 0:0)
        /// [default: `caller` for `--rw` by a user without root and outside a user namespace,
        /// as a rootless container runs; `image` otherwise]
        #[arg(long, value_enum)]
        owners: Option<OwnersArg>,
        /// (internal) IMAGE is the key of an active snapshot or view to serve
        #[arg(long, hide = true)]
        snapshot: bool,
        /// (internal) take over the live mount at DIR on this `/dev/fuse` fd (from its keeper)
        #[arg(long, hide = true, requires = "foreground")]
        resume_fd: Option<i32>,
        /// (internal) how the node ids the kernel holds for DIR were numbered
        #[arg(long, hide = true)]
        ino_scheme: Option<u32>,
    },
    /// Replace the daemon of every FUSE mount of the root by one started from the binary
    /// installed now, without unmounting: requests in flight are answered by the new daemon
    Upgrade,
    /// (internal) hold a mount's FUSE connection; start a new daemon on it when the
    /// daemon PID dies (see src/keeper.rs)
    #[command(hide = true)]
    FuseKeeper {
        #[arg(long)]
        pid: u32,
        /// The mount has an upper: its daemon hands over before a new one starts
        #[arg(long)]
        writable: bool,
        /// The daemon's arguments
        #[arg(last = true)]
        daemon_args: Vec<std::ffi::OsString>,
    },
    /// (internal) print how this build numbers FUSE nodes (a keeper asks before an upgrade)
    #[command(hide = true)]
    FuseInoScheme,
    /// Commit the changes made in a `mount --rw` directory as a new image NAME
    Commit {
        dir: PathBuf,
        name: String,
        /// Layer compression
        #[arg(long, default_value = "zstd", value_parser = ["zstd", "gzip", "none"])]
        compression: String,
    },
    /// Write an image or committed snapshot as an OCI layout directory (or OCI archive if OUT ends in .tar)
    Export {
        name: String,
        out: PathBuf,
        #[command(flatten)]
        compression: OutCompression,
    },
    /// containerd's Snapshotter contract on the command line
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Unmount a lazysnap mount (also cleans a stale one left by a killed daemon)
    Umount { dir: PathBuf },
    /// Verify the store is consistent (database, blobs, indexes, temp files, snapshot dirs);
    /// exits non-zero when problems remain
    Check {
        /// Fix what can be fixed safely, then check again
        #[arg(long)]
        repair: bool,
        /// Hash every blob (reads the whole content store)
        #[arg(long)]
        verify_digests: bool,
        #[arg(long)]
        json: bool,
    },
    /// Disk usage: content store, indexes, local copies, snapshot uppers, reclaimable bytes
    Df {
        #[arg(long)]
        json: bool,
        /// One line per snapshot upper
        #[arg(long, short)]
        verbose: bool,
    },
    /// Serve containerd's snapshots gRPC API on a unix socket (a proxy snapshotter plugin).
    /// Each snapshot is served by a detached mount daemon, so restarting or killing the server
    /// leaves running containers' filesystems working; SIGTERM/SIGINT exit.
    Serve {
        /// The unix socket to listen on (containerd's `proxy_plugins.<name>.address`)
        #[arg(long)]
        address: PathBuf,
        /// Memory for decompressed spans, per mount daemon (shared by all mounts with
        /// --in-process-mounts) (e.g. 64M, 1G)
        #[arg(long, default_value = lazysnap::mount::DEFAULT_CACHE_SIZE, value_parser = lazysnap::mount::parse_size)]
        cache_size: u64,
        /// Serve the filesystems from this process (one shared cache; they end with it, and
        /// SIGTERM unmounts them)
        #[arg(long)]
        in_process_mounts: bool,
        /// FUSE worker threads per mount [default: 2 x cores, 4..16]
        #[arg(long)]
        threads: Option<usize>,
        /// containerd's content store directory, where the diff plugin (Apply) and the
        /// remote-snapshot labels find layer blobs
        #[arg(long, default_value = lazysnap::service::diff::DEFAULT_CONTAINERD_CONTENT)]
        containerd_content: PathBuf,
        /// Do not set layers up from lazysnap index artifacts for remote-snapshot pulls
        /// (client.Pull with the cri.* labels: CRI, nerdctl, tools/rpull); containerd then
        /// fetches every layer
        #[arg(long)]
        no_lazy_pull: bool,
        /// For lazily pulled layers: a mirror tried before the image's registry
        /// (HOST[:PORT] or http(s)://HOST[:PORT]; repeatable)
        #[arg(long = "registry-mirror")]
        registry_mirrors: Vec<String>,
        /// A registry (HOST[:PORT]) spoken to over plain HTTP (loopback ones are anyway;
        /// repeatable)
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// Lazily pulled layers are never downloaded whole; mounts fetch only the ranges
        /// they read
        #[arg(long)]
        no_background_fetch: bool,
    },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYSNAP_LOG")
        // fuser warns of every ioctl it does not implement (a terminal check per program
        // start) and of unmounting a mount fusermount already took down: not ours to report.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    raise_open_file_limit();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("lazysnap: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Absolute: mount daemons run elsewhere and mountinfo lists absolute paths.
    let root_path = cli.root.clone().unwrap_or_else(default_root);
    let root_path = std::path::absolute(&root_path)
        .with_context(|| format!("resolving root {}", root_path.display()))?;
    let upper_mode = lazysnap::snapshot::UpperMode::parse(&cli.upper)?;
    if matches!(
        cli.command,
        Command::Trace { .. }
            | Command::Images { .. }
            | Command::Inspect { .. }
            | Command::Df { .. }
            | Command::Check { .. }
    ) {
        // Listings end quietly when their reader does (`| head`), as other tools' do.
        // SAFETY: restoring the default disposition of one signal; no handler runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::FuseKeeper {
            pid,
            writable,
            daemon_args,
        } => {
            lazysnap::keeper::run(pid, writable, daemon_args)?;
        }
        Command::FuseInoScheme => println!("{}", lazysnap_fuse::INO_SCHEME),
        Command::Upgrade => {
            let done = lazysnap::keeper::upgrade_all(&root_path)?;
            let mut refused = 0;
            for u in &done {
                match &u.refused {
                    None => println!(
                        "upgraded {}: daemon {} -> {} in {:.1} ms",
                        u.mountpoint.display(),
                        u.old,
                        u.new,
                        u.ms
                    ),
                    Some(why) => {
                        refused += 1;
                        println!(
                            "not upgraded {} (daemon {} serves on): {why}",
                            u.mountpoint.display(),
                            u.old
                        )
                    }
                }
            }
            println!("{} mount(s) upgraded", done.len() - refused);
            if refused > 0 {
                anyhow::bail!("{refused} mount(s) not upgraded (see above)");
            }
        }
        Command::Import {
            path,
            name,
            platform,
            limits,
        } => {
            let platform = platform
                .map(|p| Platform::parse(&p).map_err(anyhow::Error::msg))
                .transpose()?;
            let mut root = Root::open(&root_path)?;
            root.limits = limits.into();
            let mut bars = Bars::new();
            let start = std::time::Instant::now();
            let imported = import::import(
                &mut root,
                &path,
                name.as_deref(),
                platform.as_ref(),
                &mut bars,
            )?;
            bars.clear();
            for img in imported {
                print_imported("imported", &img, start);
            }
        }
        Command::Pull {
            reference,
            name,
            platform,
            mirrors,
            insecure,
            lazy,
            no_background_fetch,
            prefetch,
            limits,
        } => {
            let platform = platform
                .map(|p| Platform::parse(&p).map_err(anyhow::Error::msg))
                .transpose()?;
            let connect = lazysnap::registry::source::Connect {
                mirrors,
                insecure,
                ..Default::default()
            };
            let lazy = lazy.then(|| lazysnap::registry::source::Lazy {
                connect: connect.clone(),
                background: !no_background_fetch,
                prefetch,
            });
            let mut root = Root::open(&root_path)?;
            root.limits = limits.into();
            let mut bars = Bars::new();
            let start = std::time::Instant::now();
            let img = lazysnap::registry::pull::pull(
                &mut root,
                &reference,
                name.as_deref(),
                platform.as_ref(),
                &connect,
                lazy,
                &mut bars,
            );
            bars.clear();
            let (img, report) = img?;
            print_imported("pulled", &img, start);
            if report.remote_layers > 0 {
                println!(
                    "{} of {} layers left in the registry (read on demand)",
                    report.remote_layers, img.layers,
                );
            }
            if report.prefetched_chunks > 0 {
                println!(
                    "{} prefetched for the recorded access trace",
                    human(report.prefetched_bytes)
                );
            }
        }
        Command::Index {
            command:
                IndexCommand::Push {
                    reference,
                    name,
                    insecure,
                },
        } => {
            let connect = lazysnap::registry::source::Connect {
                insecure,
                ..Default::default()
            };
            let root = Root::open(&root_path)?;
            let name = match name {
                Some(n) => n,
                None => lazysnap::registry::Reference::parse(&reference)?.to_string(),
            };
            let start = std::time::Instant::now();
            let pushed =
                lazysnap::registry::artifact::push_index(&root, &name, &reference, &connect)?;
            println!(
                "pushed the index of {name} to {} (artifact {} for {}, {} layers indexed, {} only readable after download, {}) in {:.2}s",
                pushed.reference,
                pushed.artifact,
                pushed.subject,
                pushed.layers_indexed,
                pushed.layers_skipped,
                human(pushed.bytes),
                start.elapsed().as_secs_f64()
            );
        }
        Command::Trace { name, reset, json } => {
            let root = Root::open(&root_path)?;
            show_trace(&root, &name, reset, json)?;
        }
        Command::Push {
            name,
            reference,
            insecure,
            out,
        } => {
            let connect = lazysnap::registry::source::Connect {
                insecure,
                ..Default::default()
            };
            let root = Root::open(&root_path)?;
            let start = std::time::Instant::now();
            let pushed = lazysnap::registry::push::push(
                &root,
                &name,
                &reference,
                &connect,
                out.compression()?,
            )?;
            println!(
                "pushed {name} to {} (manifest {}, {} blobs uploaded ({}), {} already there, {} layers re-compressed) in {:.2}s",
                pushed.reference,
                pushed.manifest,
                pushed.blobs_uploaded,
                human(pushed.bytes_uploaded),
                pushed.blobs_present,
                pushed.recompressed,
                start.elapsed().as_secs_f64()
            );
        }
        Command::Unpack { name, limits } => {
            let mut root = Root::open(&root_path)?;
            root.limits = limits.into();
            let mut bars = Bars::new();
            let img = import::unpack_image(&mut root, &name, &mut bars)?;
            bars.clear();
            println!(
                "unpacked {} ({} layers, snapshot {})",
                img.name,
                img.layers,
                img.chain_id
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "none".into())
            );
        }
        Command::Images { json } => {
            let root = Root::open(&root_path)?;
            let views = root
                .meta
                .image_names()?
                .iter()
                .map(|n| lazysnap::image::view::image_view(&root, n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                println!(
                    "{:<40} {:<20} {:>12} {:>12} {:>6}",
                    "NAME", "MANIFEST", "COMPRESSED", "UNCOMPRESSED", "LAYERS"
                );
                for v in views {
                    println!(
                        "{:<40} {:<20} {:>12} {:>12} {:>6}",
                        v.name,
                        &v.manifest.digest.as_str()[..19],
                        human(v.size),
                        human(v.uncompressed_size),
                        v.rootfs.len()
                    );
                }
            }
        }
        Command::Inspect { name } => {
            let root = Root::open(&root_path)?;
            let view = lazysnap::image::view::image_view(&root, &name)?;
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        Command::Rmi { names } => {
            let mut root = Root::open(&root_path)?;
            for name in &names {
                root.meta
                    .remove_image(name)
                    .with_context(|| format!("removing {name}"))?;
            }
            let stats = lazysnap::gc::collect(&mut root)?;
            println!(
                "{}",
                json!({"removed": names, "blobs_removed": stats.blobs_removed,
                       "index_files_removed": stats.index_files_removed,
                       "bytes_freed": stats.bytes_freed})
            );
        }
        Command::Gc => {
            let mut root = Root::open(&root_path)?;
            let stats = lazysnap::gc::collect(&mut root)?;
            println!(
                "{}",
                json!({"blobs_removed": stats.blobs_removed,
                       "index_files_removed": stats.index_files_removed,
                       "bytes_freed": stats.bytes_freed})
            );
        }
        Command::Mount {
            image,
            dir,
            cache_size,
            threads,
            rw,
            snapshot,
            owners,
            ..
        } if rw && !snapshot => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("mountpoint {} does not exist", dir.display()))?;
            let owners = owners.unwrap_or_else(default_rw_owners);
            let root = Root::open(&root_path)?;
            let parent = lazysnap::mount::resolve_chain(&root, &image)?;
            let mut sn = Snapshotter::new(
                root,
                Box::new(DaemonMounter {
                    root_path: root_path.clone(),
                    cache_bytes: cache_size,
                    threads,
                    owners: owners.into(),
                }),
            );
            sn.upper_mode = upper_mode;
            let key = format!("rw:{}", dir.display());
            let start = std::time::Instant::now();
            if sn.root().meta.snapshot(&key)?.is_some() {
                // Same directory again: re-attach the changes made there before.
                sn.mounts(&key)?;
            } else {
                lazysnap::mount::prepare_mountpoint(&dir)?;
                sn.create(&key, &parent, &Default::default(), false, Some(&dir))?;
            }
            println!(
                "mounted {image} read-write at {} in {:.1} ms (snapshot {key}; `lazysnap commit {}` NAME saves it)",
                dir.display(),
                start.elapsed().as_secs_f64() * 1000.0,
                dir.display()
            );
            let row = sn
                .active_at(&dir)?
                .context("the snapshot of the mount is gone")?;
            match sn.mode_of(&row) {
                lazysnap::snapshot::UpperMode::Overlay => println!(
                    "upper: overlay: the kernel's overlayfs holds the writes (upper {}), over the shared read-only mount of {parent}",
                    sn.upper_dir(&row).display()
                ),
                lazysnap::snapshot::UpperMode::Fuse => {
                    println!(
                        "upper: fuse: lazysnap's FUSE mount holds the writes ({})",
                        sn.upper_mode().1
                    );
                    println!("{}", owners_line(owners));
                }
            }
        }
        Command::Mount {
            image,
            dir,
            foreground,
            cache_size,
            threads,
            snapshot,
            owners,
            resume_fd,
            ino_scheme,
            ..
        } => {
            let req = lazysnap::mount::MountRequest {
                owners: owners.unwrap_or(OwnersArg::Image).into(),
                snapshot,
                target: image,
                // A mount being taken over is not to be touched (no daemon serves it yet); the
                // keeper passes the canonical path the first daemon got.
                dir: if resume_fd.is_some() {
                    dir
                } else {
                    std::fs::canonicalize(&dir)
                        .with_context(|| format!("mountpoint {} does not exist", dir.display()))?
                },
                cache_bytes: cache_size,
                threads,
                resume_fd,
                ino_scheme,
            };
            let root = Root::open(&root_path)?;
            if foreground {
                lazysnap::mount::run_foreground(root, &req)?;
            } else {
                // Fail fast in this process on what can be checked here.
                lazysnap::mount::prepare_mountpoint(&req.dir)?;
                if !req.snapshot {
                    lazysnap::mount::resolve_chain(&root, &req.target)?;
                }
                drop(root);
                let log = lazysnap::mount::daemon_log(&root_path);
                if let Some(parent) = log.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let ms = lazysnap::mount::spawn_daemon(&root_path, &req, &log)?;
                println!(
                    "mounted {} at {} in {ms:.1} ms",
                    req.target,
                    req.dir.display()
                );
            }
        }
        Command::Commit {
            dir,
            name,
            compression,
        } => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("{} does not exist", dir.display()))?;
            let root = Root::open(&root_path)?;
            let mut sn = snapshotter(root, &root_path, lazysnap::mount::DEFAULT_CACHE_BYTES);
            sn.compression = parse_compression(&compression)?;
            let row = sn.active_at(&dir)?.with_context(|| {
                format!("{} is not a `lazysnap mount --rw` directory", dir.display())
            })?;
            let snap_name = format!("commit:{name}");
            if sn.root().meta.snapshot(&snap_name)?.is_some() {
                // The name is held only between the commit and the image record below: this
                // one is the leftover of an interrupted commit.
                sn.remove(&snap_name)?;
            }
            sn.commit(&snap_name, &row.key, &Default::default())?;
            let root = sn.root_mut();
            let chain = root
                .meta
                .snapshot(&snap_name)?
                .and_then(|s| s.chain_id)
                .context("committed snapshot has no chain")?;
            lazysnap::export::record_image(root, &name, &chain)?;
            // The image holds the chain now; the intermediate snapshot name is not needed.
            sn.remove(&snap_name)?;
            println!(
                "committed {} as image {name} (chain {chain})",
                dir.display()
            );
        }
        Command::Export {
            name,
            out,
            compression,
        } => {
            let root = Root::open(&root_path)?;
            let start = std::time::Instant::now();
            let e = lazysnap::export::export(&root, &name, &out, compression.compression()?)?;
            println!(
                "exported {name} to {} (manifest {}; layers {}; {} re-compressed ({})) in {:.2}s",
                out.display(),
                e.manifest,
                e.layers.join(", "),
                e.recompressed,
                human(e.recompressed_bytes),
                start.elapsed().as_secs_f64()
            );
            if compression.compression.is_none() && e.layers.contains(&"zstd") {
                eprintln!(
                    "note: older tools refuse zstd layers (Debian 12's umoci 0.4.7, Docker before 23); \
                     `--compression gzip` writes them for every tool"
                );
            }
        }
        Command::Snapshot(cmd) => {
            let root = Root::open(&root_path)?;
            let mut sn = snapshotter(root, &root_path, lazysnap::mount::DEFAULT_CACHE_BYTES);
            sn.upper_mode = upper_mode;
            snapshot_cmd(sn, cmd)?;
        }
        Command::Serve {
            address,
            cache_size,
            threads,
            containerd_content,
            in_process_mounts,
            no_lazy_pull,
            registry_mirrors,
            insecure_registries,
            no_background_fetch,
        } => {
            lazysnap::service::serve::run(lazysnap::service::serve::ServeOptions {
                root: root_path,
                address,
                cache_bytes: cache_size,
                threads,
                containerd_content: Some(containerd_content),
                in_process_mounts,
                upper_mode,
                remote: (!no_lazy_pull).then_some(lazysnap::snapshot::remote::RemoteConfig {
                    mirrors: registry_mirrors,
                    insecure_registries,
                    background: !no_background_fetch,
                }),
            })?;
        }
        Command::Check {
            repair,
            verify_digests,
            json,
        } => {
            // As is: opening normally would already remove stale temp files.
            let mut root = Root::open_as_is(&root_path)?;
            let opts = lazysnap::check::Options { verify_digests };
            let report = if repair {
                // No writer may be between writing a file and recording it.
                let _lock = root.gc_lock()?;
                lazysnap::check::repair(&mut root, &opts)?
            } else {
                lazysnap::check::check(&mut root, &opts)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            if !report.consistent {
                std::process::exit(2);
            }
        }
        Command::Df { json, verbose } => {
            let mut root = Root::open(&root_path)?;
            let du = lazysnap::df::disk_usage(&mut root)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&du)?);
            } else {
                print!("{}", du.to_text(verbose));
            }
        }
        Command::Umount { dir } => {
            if lazysnap_fuse::unmount(&dir)
                .with_context(|| format!("unmounting {}", dir.display()))?
            {
                println!("unmounted {}", dir.display());
                // A `mount --rw` there in overlay mode: let its shared lower go if unused.
                if let (Ok(dir), true) = (dir.canonicalize(), root_path.join("meta.db").is_file()) {
                    let sn = snapshotter(Root::open(&root_path)?, &root_path, 0);
                    sn.unmounted(&dir)
                        .with_context(|| format!("releasing the lower of {}", dir.display()))?;
                }
            } else {
                anyhow::bail!("{} is not mounted", dir.display());
            }
        }
    }
    Ok(())
}

fn snapshotter(root: Root, root_path: &std::path::Path, cache_bytes: u64) -> Snapshotter {
    Snapshotter::new(
        root,
        Box::new(DaemonMounter {
            root_path: root_path.to_path_buf(),
            cache_bytes,
            threads: None,
            owners: Owners::Image,
        }),
    )
}

fn parse_compression(s: &str) -> anyhow::Result<lazysnap::blob::Compression> {
    lazysnap::image::parse_compression(s).with_context(|| format!("unknown compression {s:?}"))
}

fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("label {l:?} is not KEY=VALUE"))
        })
        .collect()
}

fn snapshot_cmd(mut sn: Snapshotter, cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Prepare {
            key,
            parent,
            labels,
        } => {
            let m = sn.prepare(&key, &parent, &parse_labels(&labels)?)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        SnapshotCmd::View {
            key,
            parent,
            labels,
        } => {
            let m = sn.view(&key, &parent, &parse_labels(&labels)?)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        SnapshotCmd::Commit {
            name,
            key,
            labels,
            compression,
        } => {
            sn.compression = parse_compression(&compression)?;
            let info = sn.commit(&name, &key, &parse_labels(&labels)?)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapshotCmd::Rm { keys } => {
            for k in keys {
                sn.remove(&k)?;
                println!("removed {k}");
            }
        }
        SnapshotCmd::Stat { key } => {
            let mut info = serde_json::to_value(sn.stat(&key)?)?;
            if let Some(row) = sn
                .root()
                .meta
                .snapshot(&key)?
                .filter(|r| r.kind != "committed")
            {
                info["upper"] = json!(sn.mode_of(&row).as_str());
            }
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapshotCmd::Ls { filters, json } => {
            let mut all = Vec::new();
            sn.walk(&filters, &mut |i| all.push(i.clone()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<72} {:<72} KIND", "KEY", "PARENT");
                for i in all {
                    println!("{:<72} {:<72} {}", i.name, i.parent, i.kind.as_str());
                }
            }
        }
        SnapshotCmd::Mounts { key } => {
            println!("{}", serde_json::to_string_pretty(&sn.mounts(&key)?)?);
        }
        SnapshotCmd::Usage { key } => {
            println!("{}", serde_json::to_string(&sn.usage(&key)?)?);
        }
        SnapshotCmd::Label { key, labels } => {
            let parsed = parse_labels(&labels)?;
            let paths: Vec<String> = parsed.keys().map(|k| format!("labels.{k}")).collect();
            let set: BTreeMap<String, String> =
                parsed.into_iter().filter(|(_, v)| !v.is_empty()).collect();
            let info = sn.update(&key, &set, &paths)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapshotCmd::Apply {
            key,
            blob,
            media_type,
        } => {
            let data = std::fs::File::open(&blob)
                .with_context(|| format!("opening {}", blob.display()))?;
            let digest = sha256_file(data)?;
            let (diff, size) = sn.apply_layer(&key, &blob, &digest, &media_type)?;
            println!(
                "{}",
                serde_json::json!({"digest": digest, "diff_id": diff, "size": size})
            );
        }
        SnapshotCmd::Cleanup => {
            sn.cleanup()?;
            println!("cleaned up");
        }
    }
    Ok(())
}

fn sha256_file(mut f: std::fs::File) -> anyhow::Result<lazysnap::digest::Digest> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(lazysnap::digest::Digest::sha256_from_bytes(
        h.finalize().into(),
    ))
}

use lazysnap::df::human;

/// Progress bars on a terminal; nothing otherwise.
struct Bars {
    multi: MultiProgress,
    copy: Option<ProgressBar>,
    copy_base: u64,
    index: Option<(ProgressBar, Arc<UnpackProgress>, u64)>,
}

impl Bars {
    fn new() -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            copy: None,
            copy_base: 0,
            index: None,
        }
    }

    fn clear(&mut self) {
        if let Some(b) = self.copy.take() {
            b.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

fn bytes_style(prefix: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{prefix} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

impl IngestProgress for Bars {
    fn start_blob(&mut self, size: u64) {
        let bar = self.copy.get_or_insert_with(|| {
            let b = self.multi.add(ProgressBar::new(0));
            b.set_style(bytes_style("copy "));
            b
        });
        self.copy_base = bar.position();
        bar.inc_length(size);
    }
    fn bytes(&mut self, done: u64) {
        if let Some(b) = &self.copy {
            b.set_position(self.copy_base + done);
        }
    }
}

impl Reporter for Bars {
    fn start_unpack(&mut self, layers: u64, bytes: u64) -> Arc<UnpackProgress> {
        let progress = Arc::new(UnpackProgress::default());
        let bar = self.multi.add(ProgressBar::new(bytes));
        bar.set_style(bytes_style("index"));
        bar.enable_steady_tick(Duration::from_millis(100));
        let p = progress.clone();
        let b = bar.clone();
        std::thread::spawn(move || {
            while !b.is_finished() {
                b.set_position(
                    p.compressed_bytes
                        .load(std::sync::atomic::Ordering::Relaxed),
                );
                b.set_message(format!(
                    "layers {}/{layers}",
                    p.layers_done.load(std::sync::atomic::Ordering::Relaxed)
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        self.index = Some((bar, progress.clone(), layers));
        progress
    }
    fn finish_unpack(&mut self) {
        if let Some((bar, _, _)) = self.index.take() {
            bar.finish_and_clear();
        }
    }
}

/// `--compression` of what leaves the store (`export`, `push`).
#[derive(clap::Args)]
struct OutCompression {
    /// Re-compress layers that are not already in this compression (diffIDs stay; blob
    /// digests, media types and the manifest change) [default: as stored]
    #[arg(long, value_parser = ["gzip", "zstd", "none"])]
    compression: Option<String>,
}

impl OutCompression {
    fn compression(&self) -> anyhow::Result<Option<lazysnap::blob::Compression>> {
        self.compression
            .as_deref()
            .map(parse_compression)
            .transpose()
    }
}

/// `--owners`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OwnersArg {
    Image,
    Caller,
}

/// What a `--rw` mount shows without `--owners`: a user without root outside a user namespace
/// could write nowhere but world-writable directories under the image's owners, so there,
/// as in a rootless container, they act as the image's root.
fn default_rw_owners() -> OwnersArg {
    if lazysnap_fuse::privileged() || lazysnap_fuse::in_user_namespace() {
        OwnersArg::Image
    } else {
        OwnersArg::Caller
    }
}

/// The one line a `--rw` mount prints about whose ids files show.
fn owners_line(owners: OwnersArg) -> String {
    match owners {
        OwnersArg::Caller => {
            // SAFETY: getuid/getgid have no preconditions and cannot fail.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            format!(
                "owners: caller: every file shows as yours ({uid}:{gid}) and you act as the \
                 image's root; the commit records the image's owners (`--owners image` shows them)"
            )
        }
        OwnersArg::Image if lazysnap_fuse::privileged() || lazysnap_fuse::in_user_namespace() => {
            "owners: image: files show the ids recorded in the layers".to_string()
        }
        OwnersArg::Image => "owners: image: files show the ids recorded in the layers, so \
             without root you may change only what they let others change (`--owners caller` \
             makes every file yours)"
            .to_string(),
    }
}

impl From<OwnersArg> for Owners {
    fn from(o: OwnersArg) -> Owners {
        match o {
            OwnersArg::Image => Owners::Image,
            OwnersArg::Caller => Owners::caller(),
        }
    }
}

/// A mount keeps every layer's blob open, and a deep image has many layers (128 and more):
/// lift the soft limit on open files to the hard one, as Go programs (containerd) do at start.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read a plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let was = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!(was, "could not raise the open-file limit");
            }
        }
    }
}

/// One line per image an import or pull recorded.
/// `trace`: per lazily pulled layer, the files of its access trace in first-read order.
fn show_trace(root: &Root, name: &str, reset: bool, json: bool) -> anyhow::Result<()> {
    use lazysnap::trace::{node_paths, Trace};
    let img = root
        .meta
        .image(name)?
        .with_context(|| format!("image {name:?} not found"))?;
    let mut out = Vec::new();
    for l in &img.layers {
        let digest = lazysnap::digest::Digest::parse(&l.blob_digest)?;
        if reset {
            let p = lazysnap::trace::path(&root.path, &digest);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
            continue;
        }
        let Some(mut trace) = Trace::load(&root.path, &digest) else {
            continue;
        };
        let index = lazysnap::layer::LayerFiles::of(root, &l.blob_digest)?.index()?;
        let paths = node_paths(&index);
        trace.paths = trace
            .files
            .iter()
            .map(|a| paths.get(&a.node).cloned().unwrap_or_default())
            .collect();
        out.push((l.blob_digest.clone(), trace));
    }
    if reset {
        println!("traces of {name} removed; the next mount records new ones");
        return Ok(());
    }
    if json {
        let v: Vec<_> = out
            .iter()
            .map(|(d, t)| serde_json::json!({"layer": d, "files": t.paths, "reads": t.files}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if out.is_empty() {
        println!("no access trace recorded for {name} (one is recorded on the first mount of a lazily pulled image)");
    }
    for (d, t) in out {
        println!("layer {d}: {} files", t.files.len());
        for (a, p) in t.files.iter().zip(&t.paths) {
            println!("  {p}\t{}", human(a.read_end));
        }
    }
    Ok(())
}

fn print_imported(verb: &str, img: &import::Imported, start: std::time::Instant) {
    println!(
        "{verb} {} ({} layers, manifest {}, snapshot {}) in {:.2}s",
        img.name,
        img.layers,
        img.manifest,
        img.chain_id
            .as_ref()
            .map_or_else(|| "none".into(), |c| c.to_string()),
        start.elapsed().as_secs_f64()
    );
}
