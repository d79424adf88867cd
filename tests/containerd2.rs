//! [peers] containerd 2.x (built from its Go module by scripts/install-containerd2.sh) and runc
//! on `lazysnap serve` as proxy snapshotter **and** proxy diff plugin, in both upper modes:
//!
//! * `ctr images import` goes through 2.x's transfer service, whose unpacker applies each
//!   layer with lazysnap's differ: nothing is extracted (every committed snapshot is a blob of
//!   containerd's own content store, no upper holds a file); `ctr run` of a shell and python3,
//!   writes in the container, a `ctr snapshots commit` of a container's snapshot whose view
//!   shows exactly what the container wrote; a restart of `lazysnap serve` between two runs.
//! * nerdctl (scripts/install-peers.sh) pulls onto lazysnap through lazysnap's differ, runs on
//!   its CNI bridge network and commits a container into an image that runs;
//! * `ctr images pull` (transfer service, remote-snapshot labels from the proxy plugin's
//!   `enable_remote_snapshot_annotations` export) of an image with a lazysnap index artifact
//!   fetches no layer blob, and `ctr run` starts from it reading by range.
//!
//! Root, /dev/fuse, runc, go >= containerd's go line (to build containerd 2.x once), the
//! registry tools are prerequisites (CI=true: missing = failure).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::containerd::{assert_imported_without_extraction, text, ContainerdEnv};
use common::registry::{fetched, layout_layers, publish, Proxy, Registry};

fn prerequisites() -> bool {
    common::containerd::containerd2_prerequisites()
}

/// containerd 2.x + `lazysnap serve` with one namespace.
struct Ctr2 {
    env: ContainerdEnv,
    ns: String,
}

impl Ctr2 {
    fn start(name: &str, serve_args: &str) -> Ctr2 {
        Ctr2 {
            env: ContainerdEnv::start_v2(
                "c2",
                &[
                    ("LAZYSNAP_SERVE_ARGS", serve_args.into()),
                    ("LAZYSNAP_LOG", "info".into()),
                ],
            ),
            ns: format!("lzs2-{name}-{}", std::process::id()),
        }
    }

    fn dir(&self) -> &Path {
        &self.env.dir
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        self.env.ctr_ok(&self.ns, args)
    }

    fn ctr_in(&self, ns: &str, args: &[&str]) -> String {
        self.env.ctr_ok(ns, args)
    }

    fn run(&self, image: &str, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "lazysnap", image, id];
        args.extend_from_slice(cmd);
        self.ctr_ok(&args)
    }

    fn lazysnap_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("lazysnap.log")).unwrap_or_default()
    }

    fn lazysnap_root(&self) -> PathBuf {
        self.dir().join("lazysnap")
    }

    /// Waits until containerd answers lazysnap calls again (after a restart of serve).
    fn wait_for_snapshotter(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .env
                .ctr(&self.ns, &["snapshots", "--snapshotter", "lazysnap", "ls"]);
            if out.status.success() {
                return text(&out.stdout);
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not reconnect to lazysnap serve: {}",
                text(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The mount command `ctr snapshots mounts` prints, run (one `mount -t T SRC DIR -o OPTS`).
fn mount_printed(printed: &str) {
    let line = printed
        .lines()
        .find(|l| l.starts_with("mount "))
        .unwrap_or_else(|| panic!("no mount command in {printed:?}"));
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    let out = std::process::Command::new("mount")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn import_run_commit_restart(serve_args: &str) {
    if !prerequisites() {
        return;
    }
    let env = Ctr2::start("run", serve_args);
    let archive = "debian-gzip.oci.tar";
    let t = Instant::now();
    env.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "lazysnap",
        common::image(archive).to_str().unwrap(),
    ]);
    let import_secs = t.elapsed().as_secs_f64();
    let image = env
        .ctr_ok(&["images", "ls", "-q"])
        .lines()
        .next()
        .expect("an image after the import")
        .to_string();
    assert_imported_without_extraction(env.dir(), archive);
    let log = env.lazysnap_log();
    assert!(
        log.contains("layer indexed, not extracted"),
        "lazysnap's differ did not apply the layers:\n{log}"
    );
    assert!(!log.contains("not applying"), "{log}");
    eprintln!("containerd 2.x ctr images import {archive} ({serve_args:?}): {import_secs:.2}s");

    let out = env.run(
        &image,
        "sh",
        &["/bin/bash", "-c", "echo hello from $0; uname -s"],
    );
    assert_eq!(out, "hello from /bin/bash\nLinux\n");
    let out = env.run(
        &image,
        "py",
        &[
            "python3",
            "-c",
            "import sys, json; print(json.dumps([sys.version_info[0], 6*7]))",
        ],
    );
    assert_eq!(out.trim(), "[3, 42]");

    // A container that writes, kept (no --rm), its snapshot committed with ctr.
    let script = "set -e; mkdir -p /work/d; echo one > /work/d/a; ln /work/d/a /work/d/c; \
        echo changed >> /etc/hostname; rm /etc/issue; cat /work/d/c";
    let out = env.ctr_ok(&[
        "run",
        "--snapshotter",
        "lazysnap",
        &image,
        "writer",
        "/bin/bash",
        "-c",
        script,
    ]);
    assert_eq!(out, "one\n");
    env.ctr_ok(&["containers", "rm", "--keep-snapshot", "writer"]);
    env.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "lazysnap",
        "commit",
        "committed-writer",
        "writer",
    ]);

    // Restart serve; containerd reconnects and the committed snapshot is still there.
    let before = env.wait_for_snapshotter();
    let out = env.env.script(&["restart-snapshotter"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = env.wait_for_snapshotter();
    assert_eq!(before, after);
    assert!(after.contains("committed-writer"), "{after}");

    // The committed snapshot's view shows what the container wrote, and only that.
    env.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "lazysnap",
        "view",
        "writer-view",
        "committed-writer",
    ]);
    let mnt = tempfile::tempdir().unwrap();
    let printed = env.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "lazysnap",
        "mounts",
        mnt.path().to_str().unwrap(),
        "writer-view",
    ]);
    mount_printed(&printed);
    let read = |p: &str| std::fs::read_to_string(mnt.path().join(p));
    let seen = (
        read("work/d/a").ok(),
        std::fs::metadata(mnt.path().join("work/d/c"))
            .map(|m| std::os::unix::fs::MetadataExt::nlink(&m))
            .ok(),
        read("etc/hostname").ok().map(|h| h.ends_with("changed\n")),
        mnt.path().join("etc/issue").exists(),
        mnt.path().join("usr/bin/python3").exists(),
    );
    let _ = std::process::Command::new("umount")
        .arg(mnt.path())
        .status();
    assert_eq!(
        seen,
        (Some("one\n".into()), Some(2), Some(true), false, true),
        "(work/d/a, nlink of work/d/c, hostname changed, etc/issue exists, python3 exists)"
    );
    env.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "lazysnap",
        "rm",
        "writer-view",
    ]);

    // A run after the restart, from the image.
    let out = env.run(
        &image,
        "after",
        &[
            "python3",
            "-c",
            "import os; print(os.path.exists('/work'), os.path.exists('/etc/issue'))",
        ],
    );
    assert_eq!(out, "False True\n");
}

#[test]
fn containerd2_imports_runs_commits_and_restarts_serve_in_overlay_mode() {
    import_run_commit_restart("--upper overlay");
}

#[test]
fn containerd2_imports_runs_commits_and_restarts_serve_in_fuse_mode() {
    import_run_commit_restart("--upper fuse");
}

const PROGRAM: &str = "cat /etc/os-release; python3 --version";

#[test]
fn containerd2_pull_through_the_transfer_service_is_lazy() {
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
    let reference = format!("{}/lazy/debian:gzip", proxy.addr);
    let env = Ctr2::start("pull", "--no-background-fetch");

    let t = Instant::now();
    env.ctr_in(
        "lazy",
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
            &reference,
        ],
    );
    let pull_secs = t.elapsed().as_secs_f64();
    let (whole, ranged) = fetched(&proxy.take_requests(), &layers);
    assert!(
        whole.is_empty() && ranged == 0,
        "ctr images pull fetched layer blobs: whole {whole:?}, {ranged} bytes by range"
    );
    let content = env.env.content_digests("lazy");
    assert_eq!(
        content,
        BTreeSet::from([manifest, config]),
        "containerd's content store should hold the manifest and config only"
    );

    let t = Instant::now();
    let out = env.ctr_in(
        "lazy",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &reference,
            "lazy1",
            "bash",
            "-c",
            PROGRAM,
        ],
    );
    let run_secs = t.elapsed().as_secs_f64();
    assert!(
        out.contains("ID=lazysnap") && out.contains("Python 3."),
        "{out}"
    );
    let (whole, ranged) = fetched(&proxy.take_requests(), &layers);
    assert!(whole.is_empty(), "blobs downloaded whole: {whole:?}");
    assert!(ranged > 0 && ranged * 2 < total, "{ranged} of {total}");
    let df: serde_json::Value =
        serde_json::from_str(&common::ok(&env.lazysnap_root(), &["df", "--json"])).unwrap();
    assert_eq!(df["remote_records"]["files"], 3, "{df:#}");
    eprintln!(
        "containerd 2.x: ctr images pull {pull_secs:.2}s (no layer bytes), first ctr run \
         {run_secs:.2}s, {ranged} of {total} layer bytes by range ({:.0}%)",
        100.0 * ranged as f64 / total as f64
    );
}

/// `nerdctl --snapshotter lazysnap` on containerd 2.x (scripts/install-peers.sh): the
/// environment's socket, a data root and CNI config of its own, CNI plugins built from
/// containernetworking/plugins.
struct Nerdctl<'a> {
    env: &'a Ctr2,
    ns: &'a str,
}

impl Nerdctl<'_> {
    fn run(&self, args: &[&str]) -> String {
        let tools = common::containerd::cri_tools();
        let dir = self.env.dir();
        let (sock, data, netconf) = (
            dir.join("containerd.sock"),
            dir.join("nerdctl"),
            dir.join("cni/net.d"),
        );
        let mut all = vec![
            "--address",
            sock.to_str().unwrap(),
            "--namespace",
            self.ns,
            "--snapshotter",
            "lazysnap",
            "--data-root",
            data.to_str().unwrap(),
            "--cni-path",
            tools.cni.to_str().unwrap(),
            "--cni-netconfpath",
            netconf.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = common::containerd::run_timeout(tools.nerdctl.to_str().unwrap(), &all, &[]);
        if !out.status.success() {
            self.env.env.dump_logs();
        }
        common::containerd::check(&format!("nerdctl {args:?}"), out)
    }
}

#[test]
fn nerdctl_pulls_runs_on_a_cni_bridge_and_commits_on_lazysnap() {
    if !prerequisites() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start(&work.path().join("registry"), None);
    let reference = format!("{}/nerdctl/debian:gzip", reg.addr);
    common::registry::skopeo_push(&common::image("debian-gzip"), &reference, None, false);
    // nerdctl's default network is a bridge `nerdctl0` on 10.4.0.0/24, which CNI leaves on the
    // host; a later run refuses a subnet an interface already has. Ours goes with the test.
    let bridge_before = Path::new("/sys/class/net/nerdctl0").exists();
    struct DropBridge(bool);
    impl Drop for DropBridge {
        fn drop(&mut self) {
            if !self.0 {
                let _ = std::process::Command::new("ip")
                    .args(["link", "del", "nerdctl0"])
                    .status();
            }
        }
    }
    let _bridge = DropBridge(bridge_before);
    let env = Ctr2::start("nerdctl", "");
    let n = Nerdctl {
        env: &env,
        ns: "nerd",
    };

    let t = Instant::now();
    n.run(&["pull", "--insecure-registry", &reference]);
    let pull_secs = t.elapsed().as_secs_f64();
    assert_imported_without_extraction(env.dir(), &reference);
    assert!(
        env.lazysnap_log().contains("layer indexed, not extracted"),
        "nerdctl's pull did not go through lazysnap's differ"
    );

    // The default CNI bridge network: the container has an address on it.
    let t = Instant::now();
    let out = n.run(&[
        "run",
        "--rm",
        &reference,
        "bash",
        "-c",
        "python3 -c 'import json; print(json.dumps(6*7)); \
         print([l.split()[0] for l in open(\"/proc/net/route\") if l.split()[1] == \"00000000\"])'",
    ]);
    let run_secs = t.elapsed().as_secs_f64();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("42"), "{out}");
    // The interfaces of default routes: the bridge's veth end.
    assert_eq!(
        lines.next(),
        Some("['eth0']"),
        "no default route on the CNI bridge: {out}"
    );

    // commit: a container's change becomes an image that runs.
    n.run(&[
        "run",
        "--name",
        "w1",
        "--network",
        "none",
        &reference,
        "bash",
        "-c",
        "echo committed > /root/c.txt && rm /etc/issue",
    ]);
    n.run(&["commit", "w1", "lazysnap-test/committed:1"]);
    n.run(&["rm", "w1"]);
    let out = n.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "lazysnap-test/committed:1",
        "bash",
        "-c",
        "cat /root/c.txt; test -e /etc/issue && echo issue || echo no-issue",
    ]);
    assert_eq!(out, "committed\nno-issue\n");
    eprintln!(
        "nerdctl on containerd 2.x: pull {pull_secs:.2}s, run on the CNI bridge {run_secs:.2}s"
    );
}

/// [upgrade] Containers (runc, FUSE-mode snapshots: the mount daemons hold their writes) read
/// and write in a loop while `lazysnap upgrade` replaces every mount daemon, again and again:
/// each container checks every syscall of its loop and every byte it wrote, and exits 0 only if
/// all held. `LAZYSNAP_UPGRADE_CONTAINERS` containers (default 4; the issue's 20 with 20),
/// `LAZYSNAP_KEEPER_UPGRADES` upgrades (default 3; the issue's 10).
#[test]
fn containers_write_on_through_upgrades_of_their_mount_daemons() {
    if !prerequisites() {
        return;
    }
    let n = common::env_number("LAZYSNAP_UPGRADE_CONTAINERS", 4);
    let upgrades = common::env_number("LAZYSNAP_KEEPER_UPGRADES", 3);
    let env = Ctr2::start("upg", "--upper fuse");
    env.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "lazysnap",
        common::image("debian-gzip.oci.tar").to_str().unwrap(),
    ]);
    let image = env
        .ctr_ok(&["images", "ls", "-q"])
        .lines()
        .next()
        .expect("an image")
        .to_string();
    // Runs until /ready/stop exists... no shared dir: it runs for a while given as $1 seconds,
    // then checks what it kept. Each step's failure ends it with the step named.
    let script = r#"
        set -u
        end=$((SECONDS + $1)); i=0; kept=0
        fail() { echo "FAILED round $i: $*"; exit 1; }
        while [ $SECONDS -lt $end ]; do
            d=/work/d$((i % 10))
            mkdir -p $d || fail mkdir
            printf 'round %s\n' $i > $d/f.tmp || fail write
            mv $d/f.tmp $d/f$i || fail rename
            [ "$(cat $d/f$i)" = "round $i" ] || fail read back
            if [ $((i % 3)) -eq 0 ]; then rm $d/f$i || fail rm; else kept=$((kept + 1)); fi
            mkdir $d/sub$i && echo x > $d/sub$i/x && rm -r $d/sub$i || fail subdir
            echo "line $i" >> /etc/issue || fail append
            cat /usr/lib/python3.11/os.py /bin/bash > /dev/null || fail read lower
            i=$((i + 1))
        done
        found=0
        for f in /work/d*/f*; do
            [ "$(cat $f)" = "round ${f##*/f}" ] || fail "content of $f"
            found=$((found + 1))
        done
        [ $found -eq $kept ] || fail "$found files, $kept kept"
        k=0
        while read -r l; do
            case $l in "line "*) [ "$l" = "line $k" ] || fail "appended line $k: $l"; k=$((k + 1));; esac
        done < /etc/issue
        [ $k -eq $i ] || fail "$k appended lines of $i"
        echo "ok $i rounds"
    "#;
    let seconds = 8 + 3 * upgrades;
    let root = env.lazysnap_root();
    let mut upgrade_failures = Vec::new();
    let outcomes: Vec<(u64, std::process::Output)> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..n)
            .map(|c| {
                let (env, image) = (&env, &image);
                s.spawn(move || {
                    let id = format!("upg{c}");
                    let secs = seconds.to_string();
                    let out = env.env.ctr(
                        &env.ns,
                        &[
                            "run",
                            "--rm",
                            "--snapshotter",
                            "lazysnap",
                            image,
                            &id,
                            "/bin/bash",
                            "-c",
                            script,
                            "loop",
                            &secs,
                        ],
                    );
                    (c, out)
                })
            })
            .collect();
        // Every container's mount up (one daemon each), then the upgrades under them.
        let deadline = Instant::now() + Duration::from_secs(120);
        while common::lazysnap_processes(&root.join("snapshots")).len() < n as usize
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        let mut failed_upgrades = Vec::new();
        for u in 0..upgrades {
            let out = common::lazysnap(&root, &["upgrade"]);
            let printed = String::from_utf8_lossy(&out.stdout).into_owned();
            if !(out.status.success() && printed.contains(&format!("{n} mount(s) upgraded"))) {
                failed_upgrades.push(format!(
                    "upgrade {u}: {printed}{} (daemons {:?}, keepers {:?})",
                    String::from_utf8_lossy(&out.stderr),
                    common::lazysnap_processes(&root.join("snapshots")),
                    common::keeper_processes(&root.join("snapshots"))
                ));
            }
            // "upgraded MNT: daemon OLD -> NEW in MS ms" per mount.
            let mut ms: Vec<f64> = printed
                .lines()
                .filter_map(|l| l.strip_suffix(" ms")?.rsplit(' ').next()?.parse().ok())
                .collect();
            ms.sort_by(f64::total_cmp);
            eprintln!(
                "upgrade {u}: {}; per mount median {:?} ms, max {:?} ms",
                printed.lines().last().unwrap_or(""),
                ms.get(ms.len() / 2),
                ms.last()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        upgrade_failures = failed_upgrades;
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut rounds = 0;
    let outputs: Vec<String> = outcomes
        .iter()
        .map(|(c, o)| format!("container {c}: {}{}", text(&o.stdout), text(&o.stderr)))
        .collect();
    assert!(
        upgrade_failures.is_empty(),
        "{upgrade_failures:#?}\n{outputs:#?}\n{}",
        env.lazysnap_log()
    );
    for (c, out) in &outcomes {
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("ok "),
            "container {c}: {stdout}{}",
            text(&out.stderr)
        );
        rounds += stdout
            .split_whitespace()
            .nth(1)
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
    }
    eprintln!(
        "{n} containers, {upgrades} upgrades of every mount daemon: {rounds} rounds, 0 failures"
    );
}
