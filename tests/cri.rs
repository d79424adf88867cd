//! [peers] Kubernetes' CRI on lazysnap: containerd 2.x's CRI plugin with `snapshotter =
//! "lazysnap"` (scripts/containerd-env.sh, CONTAINERD_CRI=1) driven by crictl (built from
//! cri-tools by scripts/install-peers.sh), a pod network from the CNI plugins (bridge +
//! host-local + loopback), the pod's pause image our own (tools/pause, static Go, packed by
//! scripts/mkimage.py: registry.k8s.io is not reachable):
//!
//! * `crictl pull` of an image with a lazysnap index artifact takes the lazy path (CRI passes the
//!   remote-snapshot labels): no layer blob is fetched, containerd's content store holds the
//!   manifest and config only;
//! * `crictl runp` + `create` + `start` runs bash and python3 from it on the pod network, reading
//!   the layers by range; its log holds the program's output;
//! * `crictl imagefsinfo` reports lazysnap's root (the proxy plugin's `exports.root`).
//!
//! Root, /dev/fuse, runc, go, docker-registry, skopeo, iptables are prerequisites (CI=true:
//! missing = failure).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::containerd::{check, cri_tools, run_timeout, ContainerdEnv};
use common::registry::{fetched, layout_layers, publish, Proxy, Registry};

const SANDBOX_IMAGE: &str = "lazysnap.test/pause:1";
/// The pod network's bridge and subnet (unlikely to meet another on a test machine).
const BRIDGE: &str = "lzscri0";
const SUBNET: &str = "10.213.7.0/24";

fn prerequisites() -> bool {
    common::containerd::containerd2_prerequisites()
        && common::require(common::have_cmd("iptables"), "iptables (CNI bridge)")
}

/// tools/pause packed as a one-layer OCI archive whose Cmd is `/pause`.
fn pause_archive(work: &Path) -> PathBuf {
    let bin = work.join("rootfs/pause");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    common::go_build_tool("pause", &bin);
    let layer = work.join("pause-layer.tar");
    check(
        "tar pause",
        run_timeout(
            "tar",
            &[
                "-cf",
                layer.to_str().unwrap(),
                "-C",
                work.join("rootfs").to_str().unwrap(),
                "pause",
            ],
            &[],
        ),
    );
    let archive = work.join("pause.oci.tar");
    check(
        "mkimage.py pause",
        run_timeout(
            "python3",
            &[
                common::scripts_dir().join("mkimage.py").to_str().unwrap(),
                work.join("pause-layout").to_str().unwrap(),
                layer.to_str().unwrap(),
                "--tag",
                "1",
                "--cmd",
                r#"["/pause"]"#,
                "--oci-archive",
                archive.to_str().unwrap(),
            ],
            &[],
        ),
    );
    archive
}

struct Cri {
    env: ContainerdEnv,
}

impl Cri {
    fn crictl(&self, args: &[&str]) -> String {
        let endpoint = format!("unix://{}", self.env.socket().display());
        let mut all = vec![
            "--runtime-endpoint",
            &endpoint,
            "--image-endpoint",
            &endpoint,
            "--timeout",
            "120s",
        ];
        all.extend_from_slice(args);
        let out = run_timeout(cri_tools().crictl.to_str().unwrap(), &all, &[]);
        if !out.status.success() {
            self.env.dump_logs();
        }
        check(&format!("crictl {args:?}"), out)
    }
}

/// Removes the pod network's bridge when the test ends (CNI leaves it on the host).
struct DropBridge;
impl Drop for DropBridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", BRIDGE])
            .status();
    }
}

#[test]
fn crictl_pulls_lazily_and_runs_a_pod_from_lazysnap() {
    if !prerequisites() {
        return;
    }
    let tools = cri_tools();
    let work = tempfile::tempdir().unwrap();
    let archive = pause_archive(work.path());

    let reg = Registry::start(&work.path().join("registry"), None);
    let layout = common::image("debian-gzip");
    publish(&reg, work.path(), &layout, "cri/debian:gzip", true);
    let (layers, manifest, config) = layout_layers(&layout);
    let total: u64 = layers.values().sum();
    let log = work.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    let reference = format!("{}/cri/debian:gzip", proxy.addr);

    let _bridge = DropBridge;
    let env = ContainerdEnv::start_v2(
        "cri",
        &[
            ("CONTAINERD_CRI", "1".into()),
            ("CRI_SANDBOX_IMAGE", SANDBOX_IMAGE.into()),
            ("CNI_BIN_DIR", tools.cni.clone().into_os_string()),
            ("LAZYSNAP_SERVE_ARGS", "--no-background-fetch".into()),
            ("LAZYSNAP_LOG", "info".into()),
        ],
    );
    let dir = env.dir.clone();
    // The registry is plain HTTP: containerd's hosts.toml says so.
    let hosts = dir.join("certs.d").join(&proxy.addr);
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{a}\"\n[host.\"http://{a}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            a = proxy.addr
        ),
    )
    .unwrap();
    let netd = dir.join("cni/net.d");
    std::fs::create_dir_all(&netd).unwrap();
    std::fs::write(
        netd.join("10-lazysnap-test.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "lazysnap-test",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "loopback"}
            ]
        })
        .to_string(),
    )
    .unwrap();
    env.ctr_ok(
        "k8s.io",
        &[
            "images",
            "import",
            "--snapshotter",
            "lazysnap",
            "--base-name",
            "lazysnap.test/pause",
            archive.to_str().unwrap(),
        ],
    );
    let cri = Cri { env };
    let _ = proxy.take_requests();

    // Pull: lazy.
    let t = Instant::now();
    cri.crictl(&["pull", &reference]);
    let pull_secs = t.elapsed().as_secs_f64();
    let (whole, ranged) = fetched(&proxy.take_requests(), &layers);
    assert!(
        whole.is_empty() && ranged == 0,
        "crictl pull fetched layer blobs: whole {whole:?}, {ranged} bytes by range"
    );
    let content = cri.env.content_digests("k8s.io");
    assert!(
        content.contains(&manifest) && content.contains(&config),
        "{content:?}"
    );
    for l in layers.keys() {
        assert!(!content.contains(l), "layer {l} is in containerd's store");
    }

    // A pod on the CNI network, a container from the lazily pulled image.
    let logs = dir.join("pods");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = dir.join("pod.json");
    std::fs::write(
        &pod,
        serde_json::json!({
            "metadata": {"name": "lazy", "namespace": "default", "uid": "lazysnap-test-pod", "attempt": 1},
            "log_directory": logs,
            "linux": {}
        })
        .to_string(),
    )
    .unwrap();
    let ctr_json = dir.join("container.json");
    std::fs::write(
        &ctr_json,
        serde_json::json!({
            "metadata": {"name": "program"},
            "image": {"image": reference},
            "command": ["bash", "-c", "cat /etc/os-release; python3 --version; python3 -c \
                'print([l.split()[0] for l in open(\"/proc/net/route\") if l.split()[1] == \"00000000\"])'"],
            "log_path": "program.log",
            "linux": {}
        })
        .to_string(),
    )
    .unwrap();
    let t = Instant::now();
    let pod_id = cri
        .crictl(&["runp", pod.to_str().unwrap()])
        .trim()
        .to_string();
    let ctr_id = cri
        .crictl(&[
            "create",
            &pod_id,
            ctr_json.to_str().unwrap(),
            pod.to_str().unwrap(),
        ])
        .trim()
        .to_string();
    cri.crictl(&["start", &ctr_id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = cri.crictl(&[
            "inspect",
            "-o",
            "go-template",
            "--template",
            "{{.status.state}}",
            &ctr_id,
        ]);
        if state.trim() == "CONTAINER_EXITED" {
            break;
        }
        assert!(Instant::now() < deadline, "container still {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let run_secs = t.elapsed().as_secs_f64();
    let exit = cri.crictl(&[
        "inspect",
        "-o",
        "go-template",
        "--template",
        "{{.status.exitCode}}",
        &ctr_id,
    ]);
    let out = cri.crictl(&["logs", &ctr_id]);
    assert_eq!(exit.trim(), "0", "{out}");
    assert!(out.contains("ID=lazysnap"), "{out}");
    assert!(out.contains("Python 3."), "{out}");
    assert!(
        out.contains("['eth0']"),
        "no default route on the pod network: {out}"
    );
    let (whole, ranged) = fetched(&proxy.take_requests(), &layers);
    assert!(whole.is_empty(), "blobs downloaded whole: {whole:?}");
    assert!(ranged > 0 && ranged * 2 < total, "{ranged} of {total}");

    // kubelet's image-fs stats name lazysnap's root.
    let info: serde_json::Value =
        serde_json::from_str(&cri.crictl(&["imagefsinfo", "-o", "json"])).unwrap();
    let mountpoints: Vec<&str> = info["status"]["imageFilesystems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["fsId"]["mountpoint"].as_str())
        .collect();
    let lroot = dir.join("lazysnap");
    assert!(
        mountpoints.contains(&lroot.to_str().unwrap()),
        "imagefsinfo reports {mountpoints:?}, not {}:\n{info:#}",
        lroot.display()
    );

    cri.crictl(&["stopp", &pod_id]);
    cri.crictl(&["rmp", &pod_id]);
    eprintln!(
        "CRI on lazysnap: crictl pull {pull_secs:.2}s (no layer bytes), runp+create+start until the \
         program exited {run_secs:.2}s, {ranged} of {total} layer bytes read by range ({:.0}%)",
        100.0 * ranged as f64 / total as f64
    );
}
