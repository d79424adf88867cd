//! [containerd] Lazy pulls through containerd: a registry on loopback (scripts/registry-env.sh)
//! with the test image pushed by skopeo and its lazysnap index artifact pushed by `lazysnap
//! index push` from a builder root; a private containerd on `lazysnap serve`
//! (scripts/containerd-env.sh) pulls it with tools/rpull (containerd's client.Pull with
//! unpack and the remote-snapshot labels, as CRI and nerdctl pull), through
//! scripts/registry-proxy.py, whose request log shows what was fetched:
//!
//! * rpull fetches no layer blob (containerd's content store holds the manifest and config
//!   only), `ctr run` starts a shell and python3 from the image while most of its bytes are
//!   still in the registry (range requests only; background download off), and a plain
//!   `ctr images pull` of the same image in another namespace still fetches, unpacks and runs
//!   (and lazysnap takes the now local blobs into its store);
//! * an image without an index artifact falls back to containerd fetching its layers.
//!
//! Root, /dev/fuse, containerd, runc, ctr, docker-registry, skopeo, go and containerd's Go
//! source are prerequisites (CI=true: missing = failure). Every command runs under `timeout`;
//! environments, proxies and registries are stopped when the test ends, also on failure.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::containerd::{check, run_timeout, ContainerdEnv};
use common::registry::{fetched, layout_layers, publish, Proxy, Registry};

/// Debian's Go sources (containerd's client among them).
const GOCODE: &str = "/usr/share/gocode";

fn prerequisites() -> bool {
    common::containerd::hermetic_docker_config();
    common::require(common::is_root(), "root (containerd, FUSE mounts)")
        && common::require(common::have_dev_fuse(), "/dev/fuse")
        && common::require(
            common::have_cmd("containerd"),
            "containerd (apt-get install containerd)",
        )
        && common::require(common::have_cmd("runc"), "runc (apt-get install runc)")
        && common::require(common::have_cmd("ctr"), "ctr (Debian's containerd package)")
        && common::require(common::have_cmd("timeout"), "timeout (coreutils)")
        && common::require(
            common::have_cmd("docker-registry"),
            "docker-registry (scripts/install-deps.sh)",
        )
        && common::require(
            common::have_cmd("skopeo"),
            "skopeo (scripts/install-deps.sh)",
        )
        && common::require(
            common::have_cmd("go"),
            "go (Debian golang-go; scripts/install-deps.sh)",
        )
        && common::require(
            Path::new(GOCODE)
                .join("src/github.com/containerd/containerd/pkg/snapshotters")
                .is_dir(),
            "containerd's Go source (Debian golang-github-containerd-containerd-dev)",
        )
}

/// tools/rpull, built once per run (GOPATH mode against Debian's containerd sources, as the
/// conformance suite is built).
fn rpull_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out_dir = common::repo_root().join("target/go");
        let _lock = common::FileLock::acquire(&out_dir.join(".build.lock"));
        let bin = out_dir.join("rpull");
        let cache = std::env::var_os("GOCACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| common::repo_root().join("target/go-build-cache"));
        let t = Instant::now();
        let out = Command::new("go")
            .args(["build", "-o", bin.to_str().unwrap(), "./tools/rpull"])
            .current_dir(common::repo_root())
            .env("GO111MODULE", "off")
            .env("GOPATH", GOCODE)
            .env("GOCACHE", &cache)
            .env("GOFLAGS", "")
            .output()
            .expect("running go build");
        check("go build ./tools/rpull", out);
        eprintln!("built tools/rpull in {:.1}s", t.elapsed().as_secs_f64());
        bin
    })
    .clone()
}

/// A private containerd + `lazysnap serve` (scripts/containerd-env.sh) that rpull can use.
struct CtrEnv {
    env: ContainerdEnv,
}

impl CtrEnv {
    fn start(serve_args: &str) -> CtrEnv {
        let env = ContainerdEnv::start(
            "ctrl",
            &[
                ("LAZYSNAP_SERVE_ARGS", serve_args.into()),
                ("RPULL_BIN", rpull_bin().into_os_string()),
                ("LAZYSNAP_LOG", "info".into()),
            ],
        );
        CtrEnv { env }
    }

    fn ctr(&self, ns: &str, args: &[&str]) -> String {
        self.env.ctr_ok(ns, args)
    }

    /// `containerd-env.sh rpull REF` into namespace `ns`; returns its output and seconds.
    fn rpull(&self, ns: &str, reference: &str) -> (String, f64) {
        let t = Instant::now();
        let script = common::scripts_dir().join("containerd-env.sh");
        let out = run_timeout(
            "bash",
            &[
                script.to_str().unwrap(),
                "rpull",
                reference,
                self.env.dir.to_str().unwrap(),
            ],
            &[
                ("LAZYSNAP_BIN", common::lazysnap_bin().into_os_string()),
                ("RPULL_BIN", rpull_bin().into_os_string()),
                ("CONTAINERD_NAMESPACE", ns.into()),
            ],
        );
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            self.env.dump_logs();
        }
        (check(&format!("rpull {reference}"), out), secs)
    }

    /// `ctr run --rm` of `cmd`; returns stdout and seconds.
    fn run(&self, ns: &str, image: &str, id: &str, cmd: &[&str]) -> (String, f64) {
        let mut args = vec!["run", "--rm", "--snapshotter", "lazysnap", image, id];
        args.extend_from_slice(cmd);
        let t = Instant::now();
        let out = self.ctr(ns, &args);
        (out, t.elapsed().as_secs_f64())
    }

    fn lazysnap_root(&self) -> PathBuf {
        self.env.dir.join("lazysnap")
    }

    fn df(&self) -> serde_json::Value {
        serde_json::from_str(&common::ok(&self.lazysnap_root(), &["df", "--json"])).unwrap()
    }
}

const PROGRAM: &str = "cat /etc/os-release; python3 --version";

fn assert_program_output(out: &str) {
    assert!(out.contains("ID=lazysnap"), "{out}");
    assert!(out.contains("Python 3."), "{out}");
}

#[test]
fn rpull_is_lazy_and_a_container_starts_before_the_image_is_fetched() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start(&work.path().join("registry"), None);
    let layout = common::image("debian-gzip");
    publish(&reg, work.path(), &layout, "lazy/debian:gzip", true);
    let (layers, manifest, config) = layout_layers(&layout);
    let total: u64 = layers.values().sum();
    let log = work.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    // Through the proxy, so its log shows every byte containerd and lazysnap fetch.
    let reference = format!("{}/lazy/debian:gzip", proxy.addr);
    // No background download: what is fetched is what the container read.
    let env = CtrEnv::start("--no-background-fetch");

    let (out, pull_secs) = env.rpull("lazy", &reference);
    assert!(out.contains("pulled"), "{out}");
    let requests = proxy.take_requests();
    let (whole, ranged) = fetched(&requests, &layers);
    assert!(
        whole.is_empty() && ranged == 0,
        "rpull fetched layer blobs: whole {whole:?}, {ranged} bytes by range; requests: {requests:#?}"
    );
    assert_eq!(
        env.env.content_digests("lazy"),
        BTreeSet::from([manifest.clone(), config.clone()]),
        "containerd's content store should hold the manifest and config only"
    );
    let df = env.df();
    assert_eq!(df["remote_records"]["files"], 3, "{df:#}");
    assert_eq!(df["blobs"]["files"], 0, "{df:#}");
    let snaps = common::ok(
        &env.lazysnap_root(),
        &[
            "snapshot",
            "ls",
            "--filter",
            r#"labels."containerd.io/snapshot.ref""#,
        ],
    );
    assert_eq!(snaps.lines().skip(1).count(), 3, "{snaps}");

    let (out, run_secs) = env.run("lazy", &reference, "lazy1", &["bash", "-c", PROGRAM]);
    assert_program_output(&out);
    let requests = proxy.take_requests();
    let (whole, ranged) = fetched(&requests, &layers);
    assert!(
        whole.is_empty(),
        "layer blobs were downloaded whole while the container ran: {whole:?}"
    );
    let cached = env.df()["chunk_cache"]["bytes"].as_u64().unwrap();
    eprintln!(
        "rpull {pull_secs:.2}s (no layer bytes fetched); first `ctr run` {run_secs:.2}s, \
         {ranged} of {total} layer bytes fetched by range ({:.0}%), chunk cache {cached} bytes",
        100.0 * ranged as f64 / total as f64
    );
    assert!(ranged > 0, "the container read nothing from the registry?");
    assert!(
        ranged * 2 < total,
        "{ranged} of {total} layer bytes fetched to start the container"
    );
    assert_eq!(cached, ranged, "the chunk cache holds what was fetched");

    // A second run reads from the chunk cache.
    let (out, _) = env.run("lazy", &reference, "lazy2", &["bash", "-c", PROGRAM]);
    assert_program_output(&out);
    let (whole, again) = fetched(&proxy.take_requests(), &layers);
    assert!(whole.is_empty() && again == 0, "{whole:?} {again}");

    // `ctr images pull` (no remote-snapshot labels) still fetches and unpacks, as before; the
    // blobs it fetched are taken into lazysnap's store (reads of the lazy layers go local).
    let t = Instant::now();
    env.ctr(
        "plain",
        &["images", "pull", "--snapshotter", "lazysnap", &reference],
    );
    let plain_secs = t.elapsed().as_secs_f64();
    let (whole, _) = fetched(&proxy.take_requests(), &layers);
    assert_eq!(
        whole.iter().collect::<BTreeSet<_>>(),
        layers.keys().collect::<BTreeSet<_>>(),
        "ctr images pull fetches every layer"
    );
    let (out, _) = env.run("plain", &reference, "plain1", &["bash", "-c", PROGRAM]);
    assert_program_output(&out);
    assert_eq!(env.df()["blobs"]["files"], 3);
    eprintln!("ctr images pull {plain_secs:.2}s");
}

#[test]
fn an_image_without_an_index_artifact_is_fetched_by_containerd() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start(&work.path().join("registry"), None);
    let layout = common::image("debian-zstd");
    publish(&reg, work.path(), &layout, "plain/debian:zstd", false);
    let (layers, _, _) = layout_layers(&layout);
    let log = work.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    let reference = format!("{}/plain/debian:zstd", proxy.addr);
    let env = CtrEnv::start("");

    let (_, secs) = env.rpull("fallback", &reference);
    let (whole, _) = fetched(&proxy.take_requests(), &layers);
    assert_eq!(
        whole.iter().collect::<BTreeSet<_>>(),
        layers.keys().collect::<BTreeSet<_>>(),
        "without an index artifact containerd fetches every layer"
    );
    assert_eq!(env.df()["remote_records"]["files"], 0);
    let (out, _) = env.run("fallback", &reference, "fb1", &["bash", "-c", PROGRAM]);
    assert_program_output(&out);
    eprintln!("rpull without an index artifact: {secs:.2}s");
}

/// Serves nothing: the remote-snapshot path never mounts.
struct NoMounts;

impl lazysnap::snapshot::Mounter for NoMounts {
    fn mount(
        &self,
        _: &lazysnap::root::Root,
        _: &lazysnap::snapshot::MountSpec,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    fn unmount(&self, _: &Path) -> anyhow::Result<()> {
        Ok(())
    }
    fn is_mounted(&self, _: &Path) -> bool {
        false
    }
}

/// A chain lazysnap already has (here: imported, so its own unpack snapshots hold the chain
/// IDs as names) is reused for a remote-snapshot Prepare without any blob: the snapshot gets
/// a free name, the ref label and containerd's parent, and containerd's Walk finds it by label
/// and parent; asked again, the same snapshot answers. A chain on another parent is not
/// taken: that Prepare is an ordinary one.
#[test]
fn remote_snapshot_labels_reuse_a_chain_lazysnap_has() {
    use lazysnap::snapshot::{SnapshotError, Snapshotter};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let mut root = lazysnap::root::Root::open(dir.path()).unwrap();
    let imported = lazysnap::import::import(
        &mut root,
        &common::image("debian-gzip"),
        Some("img"),
        None,
        &mut lazysnap::import::NoProgress,
    )
    .unwrap();
    let top = imported[0].chain_id.clone().unwrap();
    let chains: Vec<String> = root
        .meta
        .chain_stack(top.as_str())
        .unwrap()
        .into_iter()
        .map(|c| c.chain_id)
        .collect();
    assert_eq!(chains.len(), 3);
    let mut sn = Snapshotter::new(root, Box::new(NoMounts));
    let labels = |chain: &str| {
        BTreeMap::from([
            ("containerd.io/snapshot.ref".to_string(), chain.to_string()),
            (
                "containerd.io/snapshot/cri.layer-digest".to_string(),
                format!("sha256:{}", "0".repeat(64)),
            ),
        ])
    };
    // containerd's metadata store, after AlreadyExists: the committed snapshot with the ref
    // label and the parent it asked for.
    let found = |sn: &Snapshotter, chain: &str, parent: &str| -> Vec<String> {
        let filter = format!(r#"labels."containerd.io/snapshot.ref"=={chain},parent=="{parent}""#);
        let mut names = Vec::new();
        sn.walk(&[filter], &mut |i| {
            if i.kind == lazysnap::snapshot::Kind::Committed {
                names.push(i.name.clone());
            }
        })
        .unwrap();
        names
    };
    let mut parent = String::new();
    for (n, chain) in chains.iter().enumerate() {
        for attempt in 0..2 {
            let key = format!("ns/{n}{attempt}/extract-{n} {chain}");
            match sn.prepare(&key, &parent, &labels(chain)) {
                Err(SnapshotError::AlreadyExists(_)) => {}
                other => panic!("layer {n}: {other:?}"),
            }
            let names = found(&sn, chain, &parent);
            assert_eq!(names, vec![format!("{chain}~1")], "layer {n}");
        }
        parent = format!("{chain}~1");
    }
    // The top chain asked for on the bottom layer: not that chain; an ordinary Prepare.
    let mounts = sn
        .prepare(
            &format!("ns/9/extract-9 {}", chains[2]),
            &format!("{}~1", chains[0]),
            &labels(&chains[2]),
        )
        .unwrap();
    assert_eq!(mounts.len(), 1);
}
