//! vhost-user-blk with a real client: an unmodified Linux guest (Debian's
//! stock kernel) under QEMU, whose `vhost-user-blk-pci` disks a backend
//! outside QEMU serves, and the data checked on the host afterwards.
//!
//! The guest is scripts/build-vhost-guest.sh's (its /init runs the job the
//! kernel command line names and prints `vub: ...` lines). QEMU runs in TCG:
//! the tests need no /dev/kvm, and this host's cannot run Linux anyway.
//!
//! The backend is `sidecore daemon --vhost-user-blk ...`, or with
//! `SIDECORE_VUB_BACKEND=qsd` qemu-storage-daemon (the reference the
//! sidecore's must match). [`backend_cmd`] is the one place either is made.

#[allow(dead_code)] // Shared helpers; this file uses only skip().
mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Every disk image: the verify job copies MiB 0 to MiB 8, the loop job
/// MiB k to MiB k + 8.
const IMAGE_MIB: usize = 16;
/// A guest that has not powered off by then is stuck (a boot and a job take
/// about 10 s here).
const VM_LIMIT: Duration = Duration::from_secs(90);

/// The built guest, or why the tests skip.
struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Builds the guest once per test binary. `None` (the caller skips) only
/// when the script failed and QEMU is not installed: a machine that cannot
/// install it (not root, no package source). Any other failure panics.
fn guest() -> Option<&'static Guest> {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    let built = GUEST.get_or_init(|| {
        if std::env::var_os("SIDECORE_IN_HWKVM_BED").is_some() {
            return Err("in the AMD-V bed: the vhost-user-blk backend does not use KVM, and these cases boot \
                        Linux under QEMU TCG, which inside the bed's own TCG would take tens of minutes; they \
                        run on the host in the same CI run"
                .into());
        }
        let project = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = project.join("target/vhost-guest");
        let script = project.join("scripts/build-vhost-guest.sh");
        let run = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let log = String::from_utf8_lossy(&run.stderr).into_owned();
        if !run.status.success() {
            let qemu_here =
                Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
            if qemu_here {
                panic!("{} failed ({}):\n{log}", script.display(), run.status);
            }
            return Err(format!(
                "qemu-system-x86_64 is missing and {} could not install it ({}): {}",
                script.display(),
                run.status,
                log.lines().last().unwrap_or("")
            ));
        }
        Ok(Guest { kernel: out.join("vmlinuz"), initrd: out.join("initrd.gz") })
    });
    match built {
        Ok(g) => Some(g),
        Err(why) => {
            common::skip(why);
            None
        }
    }
}

/// One case at a time: TCG is CPU-bound and the machine has 2 CPUs, so
/// cases in parallel would only slow each other past their limits.
fn serialize() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    // A panicking case poisons it; the next case needs nothing from it.
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A directory of the case's own (sockets, images, logs), removed when
/// dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(case: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sidecore-vub-{case}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Scratch(dir)
    }

    /// Socket and image paths for disk `i`, the image filled with random
    /// bytes.
    fn disk(&self, i: usize) -> (PathBuf, PathBuf) {
        let sock = self.0.join(format!("vub{i}.sock"));
        let img = self.0.join(format!("disk{i}.img"));
        let mut bytes = vec![0u8; IMAGE_MIB * MIB];
        File::open("/dev/urandom").and_then(|mut r| r.read_exact(&mut bytes)).expect("read /dev/urandom");
        fs::write(&img, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", img.display()));
        (sock, img)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Which backend serves the disks: `SIDECORE_VUB_BACKEND=sidecore` (the
/// default) or `qsd`.
fn backend_is_qsd() -> bool {
    match std::env::var("SIDECORE_VUB_BACKEND").as_deref() {
        Ok("qsd") => true,
        Ok("sidecore") | Err(_) => false,
        Ok(other) => panic!("SIDECORE_VUB_BACKEND={other}: expected sidecore or qsd"),
    }
}

/// The command that serves every `(socket, image)` pair, each with `queues`
/// virtqueues, from one process. Its control socket (sidecore's) goes next
/// to the first vhost-user socket.
fn backend_cmd(socks_and_images: &[(PathBuf, PathBuf)], queues: u32) -> Command {
    for (sock, img) in socks_and_images {
        // Both backends split their options at commas.
        assert!(
            !sock.to_string_lossy().contains(',') && !img.to_string_lossy().contains(','),
            "paths with commas cannot be passed as options: {} {}",
            sock.display(),
            img.display()
        );
    }
    if backend_is_qsd() {
        let mut cmd = Command::new("qemu-storage-daemon");
        for (i, (sock, img)) in socks_and_images.iter().enumerate() {
            cmd.arg("--blockdev").arg(format!("driver=file,node-name=d{i},filename={}", img.display()));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ));
        }
        cmd
    } else {
        let ctl = socks_and_images.first().and_then(|(s, _)| s.parent()).expect("at least one disk").join("ctl.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidecore"));
        cmd.arg("daemon").arg("--socket").arg(ctl).args(["--cores", "0"]);
        for (sock, img) in socks_and_images {
            let mut spec = format!("{},path={}", sock.display(), img.display());
            if queues > 1 {
                spec.push_str(&format!(",num-queues={queues}"));
            }
            cmd.arg("--vhost-user-blk").arg(spec);
        }
        cmd
    }
}

/// The backend process, its output appended to `log`; killed when dropped.
struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    /// Starts [`backend_cmd`] for the disks. With `wait_sockets`, returns
    /// once every socket exists (a restart finds the old ones still there:
    /// it does not wait, QEMU retries until it connects).
    fn start(disks: &[(PathBuf, PathBuf)], queues: u32, log: &Path, wait_sockets: bool) -> Self {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("dup the log's fd");
        let mut cmd = backend_cmd(disks, queues);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the backend {cmd:?}: {e}"));
        let mut b = Backend { child, log: log.to_path_buf() };
        let t0 = Instant::now();
        while wait_sockets && !disks.iter().all(|(s, _)| s.exists()) {
            if let Ok(Some(status)) = b.child.try_wait() {
                panic!("the backend {cmd:?} exited ({status}) before its sockets appeared:\n{}", b.log_tail());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the backend {cmd:?} made no sockets in 20 s:\n{}",
                b.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A line of QEMU's output (console or its own messages) and when it came.
type Line = (Instant, String);

/// A QEMU process, its stdout and stderr collected line by line; killed
/// when dropped.
struct Vm {
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Vm {
    /// Boots the guest with one vhost-user-blk disk per socket, `smp` CPUs
    /// and `queues` virtqueues per disk; `job` goes on the kernel command
    /// line (e.g. `vub.job=verify`).
    fn start(guest: &Guest, socks: &[&Path], smp: u32, queues: u32, job: &str) -> Self {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-accel", "tcg", "-smp", &smp.to_string(), "-m", "512"]);
        // vhost-user maps guest memory into the backend: shared memfd.
        cmd.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"]);
        for (i, sock) in socks.iter().enumerate() {
            cmd.arg("-chardev").arg(format!("socket,id=c{i},path={},reconnect=1", sock.display()));
            cmd.arg("-device").arg(format!("vhost-user-blk-pci,chardev=c{i},num-queues={queues}"));
        }
        cmd.args(["-nographic", "-no-reboot", "-kernel"]).arg(&guest.kernel).arg("-initrd").arg(&guest.initrd);
        cmd.arg("-append").arg(format!("console=ttyS0 quiet panic=-1 {job}"));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let err = child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let readers = [out, err]
            .into_iter()
            .flatten()
            .map(|pipe| {
                let lines = Arc::clone(&lines);
                std::thread::spawn(move || {
                    let mut r = BufReader::new(pipe);
                    let mut buf = Vec::new();
                    while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                        let line = without_escapes(String::from_utf8_lossy(&buf).trim_end());
                        lines.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), line));
                        buf.clear();
                    }
                })
            })
            .collect();
        Vm { child, lines, readers }
    }

    /// Waits for QEMU to exit (the guest powers off), at most `limit`.
    fn wait(&mut self, limit: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    for r in self.readers.drain(..) {
                        let _ = r.join();
                    }
                    return if status.success() { Ok(()) } else { Err(format!("QEMU exited with {status}")) };
                }
                Ok(None) if t0.elapsed() > limit => {
                    let _ = self.child.kill();
                    return Err(format!("QEMU still ran after {limit:?} (killed)"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("cannot wait for QEMU: {e}")),
            }
        }
    }

    /// Waits until a `vub:` line satisfies `pred`, at most `limit`; when it came.
    fn wait_for(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((t, _)) = lines.iter().find(|(_, l)| vub_line(l).is_some_and(&pred)) {
                return Some(*t);
            }
            drop(lines);
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn console_tail(&self) -> String {
        let text: Vec<String> = self.lines().into_iter().map(|(_, l)| l).collect();
        tail(&text.join("\n"), 40)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `line` without the terminal's escape sequences and control characters
/// (the firmware clears the screen), for the failure reports.
fn without_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI: ESC [ parameters, ended by a letter.
            '\x1b' if chars.clone().next() == Some('[') => {
                chars.by_ref().skip(1).find(char::is_ascii_alphabetic);
            }
            // Any other escape: ESC and one character.
            '\x1b' => {
                chars.next();
            }
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What follows `vub: ` in a console line (the first one comes after the
/// firmware's escape sequences, on the same line).
fn vub_line(line: &str) -> Option<&str> {
    line.find("vub: ").map(|i| &line[i + 5..])
}

/// One disk as the guest saw it.
#[derive(Debug)]
struct GuestDisk {
    name: String,
    sectors: u64,
    queues: u32,
    /// Of its first MiB.
    md5: String,
}

/// The guest's `vub:` lines, parsed.
#[derive(Debug, Default)]
struct Report {
    disks: Vec<GuestDisk>,
    /// (disk, md5 of MiB 8 after the copy)
    copies: Vec<(String, String)>,
    /// (disk, virtqueue, completion interrupts during the copy)
    irqs: Vec<(String, u32, u64)>,
    /// (when, iteration)
    loop_ok: Vec<(Instant, u64)>,
    loop_fail: Vec<String>,
    /// (iterations, half the disk in MiB)
    loop_end: Option<(u64, u64)>,
    errors: Vec<String>,
    done: bool,
}

impl Report {
    fn parse(lines: &[Line]) -> Result<Self, String> {
        let mut r = Report::default();
        for (t, line) in lines {
            let Some(v) = vub_line(line) else { continue };
            let w: Vec<&str> = v.split_whitespace().collect();
            let num = |s: &str| s.parse::<u64>().map_err(|e| format!("bad number {s:?} in {v:?}: {e}"));
            match w.as_slice() {
                ["start", ..] => {}
                ["disk", name, "sectors", s, "queues", q, "md5", m] => r.disks.push(GuestDisk {
                    name: name.to_string(),
                    sectors: num(s)?,
                    queues: q.parse().map_err(|e| format!("bad queue count in {v:?}: {e}"))?,
                    md5: m.to_string(),
                }),
                ["copy", name, "md5", m] => r.copies.push((name.to_string(), m.to_string())),
                ["irq", name, q, n] => {
                    let q = q.strip_prefix("req.").and_then(|q| q.parse().ok()).ok_or(format!("bad queue in {v:?}"))?;
                    r.irqs.push((name.to_string(), q, num(n)?));
                }
                ["loop", "ok", i] => r.loop_ok.push((*t, num(i)?)),
                ["loop", "FAIL", ..] => r.loop_fail.push(v.to_string()),
                ["loop", "end", i, "half", h] => r.loop_end = Some((num(i)?, num(h)?)),
                ["error", ..] => r.errors.push(v.to_string()),
                ["done"] => r.done = true,
                _ => return Err(format!("unknown guest line {v:?}")),
            }
        }
        Ok(r)
    }
}

/// md5 of `bytes` as hex, by the host's md5sum (coreutils).
fn md5_hex(bytes: &[u8]) -> String {
    let mut child =
        Command::new("md5sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("run md5sum (coreutils)");
    child.stdin.take().expect("md5sum's stdin").write_all(bytes).expect("feed md5sum");
    let out = child.wait_with_output().expect("md5sum's output");
    assert!(out.status.success(), "md5sum failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

fn read_image(img: &Path) -> Vec<u8> {
    let bytes = fs::read(img).unwrap_or_else(|e| panic!("read {}: {e}", img.display()));
    assert_eq!(bytes.len(), IMAGE_MIB * MIB, "{} changed size", img.display());
    bytes
}

/// The verify job's results against the image, read on the host after the
/// guest powered off.
fn check_verify(r: &Report, img: &Path, smp: u32, queues: u32) -> Result<(), String> {
    if !r.errors.is_empty() || !r.done {
        return Err(format!("the guest's job failed or did not finish: errors {:?}, done {}", r.errors, r.done));
    }
    let [disk] = r.disks.as_slice() else {
        return Err(format!("expected one disk, the guest saw {:?}", r.disks));
    };
    let bytes = read_image(img);
    let first = md5_hex(&bytes[..MIB]);
    let expect_sectors = u64::try_from(IMAGE_MIB * MIB / 512).expect("fits");
    if disk.sectors != expect_sectors || disk.queues != queues {
        return Err(format!("the guest saw {disk:?}, expected {expect_sectors} sectors and {queues} queues"));
    }
    if disk.md5 != first {
        return Err(format!("the guest read md5 {} for the first MiB, the image has {first}", disk.md5));
    }
    if r.copies != [(disk.name.clone(), first.clone())] {
        return Err(format!("the guest read back its copy as {:?}, expected md5 {first}", r.copies));
    }
    if bytes[8 * MIB..9 * MIB] != bytes[..MIB] {
        return Err(format!(
            "after the run, the image's MiB 8 is not a copy of MiB 0 ({})",
            md5_hex(&bytes[8 * MIB..9 * MIB])
        ));
    }
    // Each CPU's dd went through its own virtqueue: every one completed some.
    let per_queue: Vec<u32> = r.irqs.iter().filter(|(_, _, n)| *n > 0).map(|(_, q, _)| *q).collect();
    let want: Vec<u32> = (0..queues.min(smp)).collect();
    if per_queue.len() != want.len() || !want.iter().all(|q| per_queue.contains(q)) {
        return Err(format!("expected completions on virtqueues {want:?} during the copy, got {:?}", r.irqs));
    }
    Ok(())
}

/// Panics with `why`, QEMU's console tail and the backend's log.
fn fail(case: &str, why: &str, vms: &[&Vm], backend: &Backend) -> ! {
    let mut msg = format!("{case}: {why}\n");
    for (i, vm) in vms.iter().enumerate() {
        msg.push_str(&format!("--- QEMU {i}: console and messages, last lines ---\n{}\n", vm.console_tail()));
    }
    msg.push_str(&format!("--- backend log ({}) ---\n{}\n", backend.log.display(), backend.log_tail()));
    panic!("{msg}");
}

/// One VM, one disk, the verify job.
fn verify_case(case: &str, smp: u32, queues: u32) {
    let Some(guest) = guest() else { return };
    let _one = serialize();
    let t0 = Instant::now();
    let dir = Scratch::new(case);
    let disk = dir.disk(0);
    let backend = Backend::start(std::slice::from_ref(&disk), queues, &dir.0.join("backend.log"), true);
    let mut vm = Vm::start(guest, &[&disk.0], smp, queues, "vub.job=verify");
    let result = vm
        .wait(VM_LIMIT)
        .and_then(|()| Report::parse(&vm.lines()))
        .and_then(|r| check_verify(&r, &disk.1, smp, queues));
    if let Err(why) = result {
        fail(case, &why, &[&vm], &backend);
    }
    if !backend_is_qsd() {
        if let Err(why) = check_daemon_counters(&dir.0.join("ctl.sock"), queues) {
            fail(case, &why, &[&vm], &backend);
        }
    }
    eprintln!("{case}: passed in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The daemon's own account of the run (`status`): the guest's MiB read
/// and written went through the device, on every queue it used, with no
/// refused chain, host I/O error or protocol error.
fn check_daemon_counters(ctl: &Path, queues: u32) -> Result<(), String> {
    let r = sidecore_vmm::daemon::query_status(ctl).map_err(|e| format!("status from the daemon: {e}"))?;
    let [d] = r.vhost_user_blk.as_slice() else {
        return Err(format!("status lists {} vhost-user-blk devices, expected 1", r.vhost_user_blk.len()));
    };
    let sum = |f: fn(&sidecore_vmm::daemon::BlkQueueStatus) -> u64| d.queues.iter().map(f).sum::<u64>();
    let (read, written) = (sum(|q| q.read_bytes), sum(|q| q.written_bytes));
    let bad = sum(|q| q.bad_chains) + sum(|q| q.io_errors) + d.protocol_errors;
    let used = d.queues.iter().filter(|q| q.requests > 0).count();
    if d.connections < 1 || read < MIB as u64 || written < MIB as u64 || bad != 0 || used < queues as usize {
        return Err(format!(
            "daemon counters: {} connections, {read} bytes read, {written} written, {bad} errors, {used} queues \
             with requests (want >= 1, >= 1 MiB each way, 0, {queues}): {d:?}",
            d.connections
        ));
    }
    Ok(())
}

#[test]
fn verify_one_queue() {
    verify_case("verify-1q", 1, 1);
}

#[test]
fn verify_two_cpus_two_queues() {
    verify_case("verify-2q", 2, 2);
}

/// Two VMs at once, each its own disk, both served by one backend process.
#[test]
fn two_vms_one_backend() {
    let case = "two-vms";
    let Some(guest) = guest() else { return };
    let _one = serialize();
    let t0 = Instant::now();
    let dir = Scratch::new(case);
    let disks = [dir.disk(0), dir.disk(1)];
    let backend = Backend::start(&disks, 1, &dir.0.join("backend.log"), true);
    let mut vms: Vec<Vm> = disks.iter().map(|(sock, _)| Vm::start(guest, &[sock], 1, 1, "vub.job=verify")).collect();
    for (i, (vm, (_, img))) in vms.iter_mut().zip(&disks).enumerate() {
        let result =
            vm.wait(VM_LIMIT).and_then(|()| Report::parse(&vm.lines())).and_then(|r| check_verify(&r, img, 1, 1));
        if let Err(why) = result {
            let all: Vec<&Vm> = vms.iter().collect();
            fail(case, &format!("VM {i}: {why}"), &all, &backend);
        }
    }
    // Each guest wrote only its own image: the two still differ.
    let (a, b) = (read_image(&disks[0].1), read_image(&disks[1].1));
    if a[..MIB] == b[..MIB] {
        let all: Vec<&Vm> = vms.iter().collect();
        fail(case, "the two images' first MiB are equal: one VM was served the other's disk", &all, &backend);
    }
    eprintln!("{case}: passed in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The backend is killed (SIGKILL) under a guest doing I/O and started again
/// on the same socket: QEMU reconnects (`reconnect=1`), the guest's I/O
/// carries on, nothing it wrote or read is wrong.
#[test]
fn backend_restart_mid_run() {
    let case = "restart";
    let Some(guest) = guest() else { return };
    let _one = serialize();
    let t0 = Instant::now();
    let dir = Scratch::new(case);
    let disk = dir.disk(0);
    let disks = std::slice::from_ref(&disk);
    let log = dir.0.join("backend.log");
    let mut backend = Backend::start(disks, 1, &log, true);
    let mut vm = Vm::start(guest, &[&disk.0], 1, 1, "vub.job=loop vub.secs=8");
    if vm.wait_for(Duration::from_secs(60), |l| l.starts_with("loop ok")).is_none() {
        fail(case, "the guest's loop never started (no `loop ok` within 60 s)", &[&vm], &backend);
    }
    std::thread::sleep(Duration::from_secs(2));
    backend.kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    backend = Backend::start(disks, 1, &log, false);
    let since = Instant::now();
    let result = vm.wait(VM_LIMIT).and_then(|()| Report::parse(&vm.lines())).and_then(|r| {
        if !r.errors.is_empty() || !r.done || !r.loop_fail.is_empty() {
            return Err(format!("the loop failed: errors {:?}, FAIL lines {:?}, done {}", r.errors, r.loop_fail, r.done));
        }
        let before = r.loop_ok.iter().filter(|(t, _)| *t < killed).count();
        let after = r.loop_ok.iter().filter(|(t, _)| *t > since).count();
        if before == 0 || after < 2 {
            return Err(format!("expected loop ok lines before the kill and after the restart: {before} before, {after} after"));
        }
        let Some((iters, half)) = r.loop_end else { return Err("no `loop end` line".to_string()) };
        let iters_n = usize::try_from(iters).map_err(|e| e.to_string())?;
        if iters_n != r.loop_ok.len() || usize::try_from(half).ok() != Some(IMAGE_MIB / 2) {
            return Err(format!("loop end {iters} half {half}, but {} ok lines and a {IMAGE_MIB} MiB disk", r.loop_ok.len()));
        }
        let bytes = read_image(&disk.1);
        let half_n = IMAGE_MIB / 2;
        for k in 0..iters_n.min(half_n) {
            let (src, dst) = (&bytes[k * MIB..(k + 1) * MIB], &bytes[(k + half_n) * MIB..(k + half_n + 1) * MIB]);
            if src != dst {
                return Err(format!("after the run, the image's MiB {} is not a copy of MiB {k}", k + half_n));
            }
        }
        eprintln!(
            "{case}: {iters} iterations, {before} before the kill, {after} after the restart ({:.1} s from the restart to the first)",
            r.loop_ok.iter().find(|(t, _)| *t > since).map_or(0.0, |(t, _)| t.duration_since(since).as_secs_f64())
        );
        Ok(())
    });
    if let Err(why) = result {
        fail(case, &why, &[&vm], &backend);
    }
    eprintln!("{case}: passed in {:.1} s", t0.elapsed().as_secs_f64());
}
