//! The `lazysnap` command line: a thin layer over the library.

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
use lazysnap::root::{default_root, Root};
use lazysnap::unpack::UnpackProgress;

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
    #[command(subcommand)]
    command: Command,
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
    },
    /// Index an imported image's layers again (what import does after copying blobs)
    Unpack { name: String },
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
        /// Memory for decompressed spans (e.g. 256M, 1G)
        #[arg(long, default_value = "256M", value_parser = lazysnap::mount::parse_size)]
        cache_size: u64,
        /// FUSE worker threads [default: 2 x cores, 4..16]
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Unmount a lazysnap mount (also cleans a stale one left by a killed daemon)
    Umount { dir: PathBuf },
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("lazysnap: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root_path = cli.root.clone().unwrap_or_else(default_root);
    match cli.command {
        Command::Import {
            path,
            name,
            platform,
        } => {
            let platform = platform
                .map(|p| Platform::parse(&p).map_err(anyhow::Error::msg))
                .transpose()?;
            let mut root = Root::open(&root_path)?;
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
                println!(
                    "imported {} ({} layers, manifest {}, snapshot {}) in {:.2}s",
                    img.name,
                    img.layers,
                    img.manifest,
                    img.chain_id
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "none".into()),
                    start.elapsed().as_secs_f64()
                );
            }
        }
        Command::Unpack { name } => {
            let mut root = Root::open(&root_path)?;
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
            let stats = lazysnap::gc::collect(&mut root, &[])?;
            println!(
                "{}",
                json!({"removed": names, "blobs_removed": stats.blobs_removed,
                       "index_files_removed": stats.index_files_removed,
                       "bytes_freed": stats.bytes_freed})
            );
        }
        Command::Gc => {
            let mut root = Root::open(&root_path)?;
            let stats = lazysnap::gc::collect(&mut root, &[])?;
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
            foreground,
            cache_size,
            threads,
        } => {
            let req = lazysnap::mount::MountRequest {
                target: image,
                dir: std::fs::canonicalize(&dir)
                    .with_context(|| format!("mountpoint {} does not exist", dir.display()))?,
                cache_bytes: cache_size,
                threads,
            };
            let root = Root::open(&root_path)?;
            if foreground {
                lazysnap::mount::run_foreground(root, &req)?;
            } else {
                // Fail fast in this process on what can be checked here.
                lazysnap::mount::prepare_mountpoint(&req.dir)?;
                lazysnap::mount::resolve_chain(&root, &req.target)?;
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
        Command::Umount { dir } => {
            if lazysnap_fuse::unmount(&dir)
                .with_context(|| format!("unmounting {}", dir.display()))?
            {
                println!("unmounted {}", dir.display());
            } else {
                anyhow::bail!("{} is not mounted", dir.display());
            }
        }
    }
    Ok(())
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

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
