//! `cargo xtask image`: builds `deploy/Dockerfile` into an image, with `docker build` when a Docker engine answers,
//! else with podman on local base images, so that the image can be built on a machine that has neither an engine
//! nor Docker Hub: `debian:bookworm` and `debian:bookworm-slim` are then made with debootstrap from Debian's own
//! archive (with the official images' apt sources and apt/dpkg settings) and imported into podman's store under
//! `--cache-dir`. Installs what it needs (podman, runc, debootstrap) like `setup`, skipping what is present, and
//! says what it does. Then runs `lb-agent --version` from the image and compares it with the agent built here from the
//! same tree: the commit and the eBPF object's hash must be the same.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::util::{exec, install_packages, is_root, succeeds, workspace_root};

mod smoke;

#[derive(clap::Args)]
pub struct Options {
    /// The image's name [default: the image `lb-agent manifests` names, localhost/lb-agent:<version>].
    #[arg(long, default_value = DEFAULT_TAG)]
    pub tag: String,
    /// Where podman keeps its store and the debootstrapped base (several GB; not used with a Docker engine).
    #[arg(long, env = "LB_IMAGE_CACHE", default_value = "/var/tmp/lb-image")]
    pub cache_dir: PathBuf,
    /// Use podman even when a Docker engine answers.
    #[arg(long)]
    pub podman: bool,
    /// After the build, run the image's agent for real (podman only): in a network namespace of its own with a
    /// pod namespace behind it, with exactly the capabilities of deploy/lb-agent.yaml, until ready; then list
    /// its maps, send traffic through the socket LB and a NodePort, and `lb-agent cleanup`. Removes all it made.
    #[arg(long)]
    pub smoke: bool,
}

/// What `lb-agent manifests` names by default (`lb_agent::install::DEFAULT_IMAGE`: both come from the workspace
/// version; lb-agent's deploy test checks the rendering names this tag).
pub const DEFAULT_TAG: &str = concat!("localhost/lb-agent:", env!("CARGO_PKG_VERSION"));
/// The rendered default manifests (`lb-agent manifests`), whose DaemonSet the smoke run imitates.
const RENDERED_MANIFESTS: &str = "deploy/lb-agent.yaml";

/// The Debian packages the podman path needs. runc rather than crun: crun refuses hybrid cgroup hosts (cgroup v1
/// controllers with cgroup2 mounted beside them, as here).
const PACKAGES: &[&str] = &["podman", "runc", "debootstrap"];
const MIRROR: &str = "http://deb.debian.org/debian";

/// The official image's apt sources (deb822): bookworm-security is where rustc-web 1.96 and LLVM 22 come from.
const DEBIAN_SOURCES: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// The official images' apt settings (debuerreotype): no package caches kept in layers, no translations.
const APT_DOCKER_CLEAN: &str = r#"DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"#;
const APT_NO_LANGUAGES: &str = "Acquire::Languages \"none\";\n";
const APT_GZIP_INDEXES: &str = "Acquire::GzipIndexes \"true\";\n";
const APT_NO_SUGGESTS: &str = "Apt::AutoRemove::SuggestsImportant \"false\";\n";
/// What `-slim` leaves out (debuerreotype's slimify), for packages installed later too.
const DPKG_SLIM: &str = "path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
";

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let root = workspace_root();
    let started = Instant::now();
    if !opts.podman && !opts.smoke && succeeds(Command::new("docker").arg("info")) {
        eprintln!("image: a Docker engine answers: docker build");
        let commit = commit_of(&root);
        exec(Command::new("docker").current_dir(&root).args([
            "build",
            "--build-arg",
            &format!("LB_COMMIT={commit}"),
            "-f",
            "deploy/Dockerfile",
            "-t",
            &opts.tag,
            ".",
        ]))?;
        let image_version =
            capture(Command::new("docker").args(["run", "--rm", &opts.tag, "--version"]))?;
        compare_versions(&image_version)?;
        eprintln!(
            "image: built {} with docker in {:.0?}",
            opts.tag,
            started.elapsed()
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "no Docker engine answers, and the podman build (local debootstrapped base images) needs root: run \
             it as root"
        );
    }
    eprintln!("image: no Docker engine (or --podman): podman with local base images");
    install_packages("image", PACKAGES)?;
    let podman = Podman::new(&opts.cache_dir)?;
    base_images(&podman, &opts.cache_dir)?;
    let t = Instant::now();
    let mut build = podman.cmd();
    build.current_dir(&root).args([
        "build",
        // No OCI runtime for RUN steps: a chroot works on any host this runs on.
        "--isolation",
        "chroot",
        // apt and crates.io straight from the host's network.
        "--network",
        "host",
        // The base images are the local ones made above; Docker Hub may be unreachable.
        "--pull=never",
    ]);
    podman.ulimits(&mut build);
    // Behind a TLS-intercepting proxy cargo must trust what the host trusts (the Dockerfile's CARGO_HTTP_CAINFO);
    // the bundle is mounted for the build only and lands in no layer.
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.exists() {
        build
            .arg("--volume")
            .arg(format!("{}:/run/lb-build/ca.crt:ro", ca.display()))
            .args(["--build-arg", "CARGO_HTTP_CAINFO=/run/lb-build/ca.crt"]);
    }
    // The image has no .git (.dockerignore): the commit comes in as a build argument, as build.rs reads it.
    build.args(["--build-arg", &format!("LB_COMMIT={}", commit_of(&root))]);
    build.args(["-f", "deploy/Dockerfile", "-t", &opts.tag, "."]);
    exec(&mut build)?;
    let build_time = t.elapsed();
    let mut version = podman.cmd();
    // No network: podman's default bridge (netavark) would switch on the host's ip_forward and add iptables chains.
    version.args(["run", "--rm", "--runtime", "runc", "--network", "none"]);
    podman.ulimits(&mut version);
    let image_version = capture(version.args([&opts.tag, "--version"]))?;
    compare_versions(&image_version)?;
    exec(podman.cmd().args(["images", &opts.tag]))?;
    eprintln!(
        "image: built {} with podman (store {}) in {:.0?} ({:.0?} of it `podman build`)",
        opts.tag,
        podman.root.display(),
        started.elapsed(),
        build_time
    );
    eprintln!(
        "image: run it with: podman --root {} --runroot {} --storage-driver overlay run --runtime runc {} ...",
        podman.root.display(),
        podman.runroot.display(),
        opts.tag
    );
    if opts.smoke {
        let t = Instant::now();
        smoke::run(&podman, &opts.tag)?;
        eprintln!("image: smoke run passed in {:.0?}", t.elapsed());
    }
    Ok(())
}

/// podman with its own store under the cache directory, so nothing touches a system-wide container store.
struct Podman {
    root: PathBuf,
    runroot: PathBuf,
    /// `--ulimit` values the build's processes get: podman's defaults (1048576 open files) exceed what a
    /// process without CAP_SYS_RESOURCE may set, so stay within this process's own hard limits.
    nofile: u64,
    nproc: u64,
}

impl Podman {
    fn new(cache: &Path) -> anyhow::Result<Podman> {
        std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let hard = |name: &str| -> Option<u64> {
            let line = limits.lines().find(|l| l.starts_with(name))?;
            let rest = line[name.len()..].split_whitespace().nth(1)?;
            rest.parse().ok()
        };
        Ok(Podman {
            root: cache.join("storage"),
            runroot: cache.join("run"),
            nofile: hard("Max open files").unwrap_or(1024).min(65536),
            // A build needs hundreds of processes at most; well under any hard limit (the hard limit itself was
            // refused by runc here).
            nproc: hard("Max processes").unwrap_or(4096).min(4096),
        })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args([
                "--storage-driver",
                "overlay",
                "--cgroup-manager",
                "cgroupfs",
            ]);
        c
    }

    fn ulimits(&self, c: &mut Command) {
        c.arg("--ulimit")
            .arg(format!("nofile={0}:{0}", self.nofile))
            .arg("--ulimit")
            .arg(format!("nproc={0}:{0}", self.nproc));
    }

    fn has_image(&self, name: &str) -> bool {
        let mut c = self.cmd();
        succeeds(c.args(["image", "exists", name]))
    }
}

/// `debian:bookworm` and `debian:bookworm-slim` in the podman store, debootstrapped when missing.
fn base_images(podman: &Podman, cache: &Path) -> anyhow::Result<()> {
    let full = "docker.io/library/debian:bookworm";
    let slim = "docker.io/library/debian:bookworm-slim";
    if podman.has_image(full) && podman.has_image(slim) {
        eprintln!("image: base images {full} and {slim} present");
        return Ok(());
    }
    let t = Instant::now();
    let rootfs = cache.join("rootfs-bookworm");
    let done = cache.join("rootfs-bookworm.done");
    if !done.exists() {
        if rootfs.exists() {
            std::fs::remove_dir_all(&rootfs)
                .with_context(|| format!("removing the unfinished {}", rootfs.display()))?;
        }
        eprintln!(
            "image: debootstrap bookworm (minbase) into {}",
            rootfs.display()
        );
        exec(
            Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(&rootfs)
                .arg(MIRROR),
        )?;
        configure_apt(&rootfs)?;
        std::fs::write(&done, b"").context("marking the rootfs done")?;
    }
    import(podman, &rootfs, full)?;
    let slim_rootfs = cache.join("rootfs-bookworm-slim");
    if slim_rootfs.exists() {
        std::fs::remove_dir_all(&slim_rootfs)
            .with_context(|| format!("removing {}", slim_rootfs.display()))?;
    }
    exec(Command::new("cp").arg("-a").arg(&rootfs).arg(&slim_rootfs))?;
    slimify(&slim_rootfs)?;
    import(podman, &slim_rootfs, slim)?;
    std::fs::remove_dir_all(&slim_rootfs)
        .with_context(|| format!("removing {}", slim_rootfs.display()))?;
    eprintln!("image: base images ready in {:.0?}", t.elapsed());
    Ok(())
}

/// The official image's apt sources and settings, and no package lists or caches left in the image.
fn configure_apt(rootfs: &Path) -> anyhow::Result<()> {
    let write = |rel: &str, text: &str| -> anyhow::Result<()> {
        let p = rootfs.join(rel);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    let _ = std::fs::remove_file(rootfs.join("etc/apt/sources.list"));
    write("etc/apt/sources.list.d/debian.sources", DEBIAN_SOURCES)?;
    write("etc/apt/apt.conf.d/docker-clean", APT_DOCKER_CLEAN)?;
    write("etc/apt/apt.conf.d/docker-no-languages", APT_NO_LANGUAGES)?;
    write("etc/apt/apt.conf.d/docker-gzip-indexes", APT_GZIP_INDEXES)?;
    write(
        "etc/apt/apt.conf.d/docker-autoremove-suggests",
        APT_NO_SUGGESTS,
    )?;
    for dir in ["var/lib/apt/lists", "var/cache/apt"] {
        clear_files(&rootfs.join(dir), &|_| true)?;
    }
    Ok(())
}

/// What `-slim` drops: documentation but copyright files, manuals, locales; and dpkg told to keep doing so.
fn slimify(rootfs: &Path) -> anyhow::Result<()> {
    std::fs::write(rootfs.join("etc/dpkg/dpkg.cfg.d/docker"), DPKG_SLIM)
        .context("writing the slim dpkg config")?;
    clear_files(&rootfs.join("usr/share/doc"), &|p| {
        p.file_name().is_none_or(|n| n != "copyright")
    })?;
    for dir in [
        "usr/share/info",
        "usr/share/locale",
        "usr/share/man",
        "usr/share/groff",
        "usr/share/lintian/overrides",
    ] {
        clear_files(&rootfs.join(dir), &|_| true)?;
    }
    Ok(())
}

/// Removes the regular files and symlinks under `dir` for which `remove` holds (directories stay).
fn clear_files(dir: &Path, remove: &dyn Fn(&Path) -> bool) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let ty = entry.file_type().context("file type")?;
        if ty.is_dir() {
            clear_files(&path, remove)?;
        } else if remove(&path) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn import(podman: &Podman, rootfs: &Path, name: &str) -> anyhow::Result<()> {
    eprintln!("image: importing {} as {name}", rootfs.display());
    let tar = rootfs.with_extension("tar");
    exec(
        Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    let mut c = podman.cmd();
    let result = exec(
        c.args(["import", "--change", r#"CMD ["bash"]"#])
            .arg(&tar)
            .arg(name),
    );
    let _ = std::fs::remove_file(&tar);
    result
}

/// The commit string lb-agent's build.rs computes from git (HEAD, `-dirty` when tracked files differ).
fn commit_of(root: &Path) -> String {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

/// Stdout of a command that must succeed, echoed.
fn capture(cmd: &mut Command) -> anyhow::Result<String> {
    eprintln!("+ {cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{text}");
    Ok(text)
}

/// Builds the agent here from the same tree (release, object embedded) and checks that its `--version` names the
/// same commit and eBPF object as the image's.
fn compare_versions(image_version: &str) -> anyhow::Result<()> {
    let root = workspace_root();
    crate::build_ebpf::run(&crate::build_ebpf::Options::default())?;
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--release", "-p", "lb-agent"]),
    )?;
    let local = capture(Command::new(root.join("target/release/lb-agent")).arg("--version"))?;
    let fields = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("commit: ") || l.starts_with("ebpf-object: "))
            .map(str::to_owned)
            .collect()
    };
    let (image, here) = (fields(image_version), fields(&local));
    if image.len() != 2 || image != here {
        bail!("the image's agent is not the one this tree builds: image {image:?}, here {here:?}");
    }
    eprintln!(
        "image: the image's agent and the one built here agree: {}",
        here.join(", ")
    );
    Ok(())
}
