//! What a `sidecore bench` run measures: the ops and paths the command line
//! can name, their defaults, and the (op, path) rows a selection produces —
//! one place that the CLI, the progress bar's sample count and the README
//! check (tests/readme_example.rs) all read.

use shm_proto::bench::{BenchOp, BenchPath, BENCH_BLOCK_SAMPLES};

/// An op on the command line (`--ops`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum OpChoice {
    /// The null call.
    #[value(name = "null")]
    Null,
    /// CPUID leaf 0.
    #[value(name = "cpuid")]
    Cpuid,
    /// One map of a fresh page-table entry.
    #[value(name = "pte")]
    Pte,
    /// Map a fresh page, then touch it (with its batched variants).
    #[value(name = "pagefault")]
    Pagefault,
    /// 8 pages per batched sidecall.
    #[value(name = "pagefault-batch8")]
    PagefaultBatch8,
    /// 32 pages per batched sidecall.
    #[value(name = "pagefault-batch32")]
    PagefaultBatch32,
    /// Event delivery, timed by the host.
    #[value(name = "irq")]
    Irq,
    /// A UDP packet's round trip through the guest's device, timed by the host.
    #[value(name = "echo")]
    Echo,
}

impl OpChoice {
    /// The guest-timed op, or `None` for the host-timed `irq` and `echo`.
    pub const fn guest_op(self) -> Option<BenchOp> {
        match self {
            OpChoice::Null => Some(BenchOp::Null),
            OpChoice::Cpuid => Some(BenchOp::Cpuid),
            OpChoice::Pte => Some(BenchOp::Pte),
            OpChoice::Pagefault => Some(BenchOp::Pagefault),
            OpChoice::PagefaultBatch8 => Some(BenchOp::PagefaultBatch8),
            OpChoice::PagefaultBatch32 => Some(BenchOp::PagefaultBatch32),
            OpChoice::Irq | OpChoice::Echo => None,
        }
    }

    /// Name on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            OpChoice::Irq => "irq",
            OpChoice::Echo => "echo",
            other => match other.guest_op() {
                Some(op) => op.name(),
                None => "?",
            },
        }
    }
}

/// A path on the command line (`--paths`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum PathChoice {
    /// The backend's in-kernel trap.
    #[value(name = "kernel")]
    Kernel,
    /// An exit to this VMM.
    #[value(name = "user")]
    User,
    /// The ring.
    #[value(name = "sidecall")]
    Sidecall,
}

impl PathChoice {
    /// The protocol's path.
    pub const fn path(self) -> BenchPath {
        match self {
            PathChoice::Kernel => BenchPath::Kernel,
            PathChoice::User => BenchPath::User,
            PathChoice::Sidecall => BenchPath::Sidecall,
        }
    }
}

/// `--ops` when not given.
pub const DEFAULT_OPS: [OpChoice; 6] =
    [OpChoice::Null, OpChoice::Cpuid, OpChoice::Pte, OpChoice::Pagefault, OpChoice::Irq, OpChoice::Echo];
/// `--paths` when not given.
pub const DEFAULT_PATHS: [PathChoice; 3] = [PathChoice::Kernel, PathChoice::User, PathChoice::Sidecall];
/// `--echo-vms` when not given.
pub const DEFAULT_ECHO_VMS: usize = 4;
/// Largest `--block` (a block must fit the guest's [`shm_proto::bench::BenchBlock`]).
pub const MAX_BLOCK: u64 = 4096;
const _: () = assert!(MAX_BLOCK == BENCH_BLOCK_SAMPLES as u64);

/// Samples per (op, path) the guest takes when `--iters` is not given
/// (guest-agent's `DEFAULT_ITERS`).
pub const GUEST_DEFAULT_ITERS: u64 = 100_000;
/// The same for the page-table ops (guest-agent's `DEFAULT_PT_ITERS`; the
/// page-table pool may bound them lower).
pub const GUEST_DEFAULT_PT_ITERS: u64 = 10_000;
/// Samples per host-timed series when `--iters` is not given.
pub const HOST_DEFAULT_ITERS: u64 = 10_000;

/// One bench run's selection, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Bit mask of guest-timed [`BenchOp`]s (`pagefault` brings its batched
    /// variants, as the guest does).
    pub guest_ops: u64,
    /// Host-timed ops, in command-line order, without repeats.
    pub host_ops: Vec<OpChoice>,
    /// Bit mask of [`BenchPath`]s.
    pub paths: u64,
    /// VMs of the second echo series (1: none).
    pub echo_vms: usize,
    /// Idle rings in every other sidecall block (0: none).
    pub idle_rings: u32,
    /// `--iters`.
    pub iters: Option<u64>,
}

impl Selection {
    /// Resolves the command line's choices.
    pub fn new(
        ops: &[OpChoice],
        paths: &[PathChoice],
        echo_vms: usize,
        idle_rings: u32,
        iters: Option<u64>,
    ) -> Selection {
        let mut guest_ops = 0u64;
        let mut host_ops = Vec::new();
        for &o in ops {
            match o.guest_op() {
                Some(op) => guest_ops |= 1 << op as u32,
                None if !host_ops.contains(&o) => host_ops.push(o),
                None => {}
            }
        }
        if guest_ops & (1 << BenchOp::Pagefault as u32) != 0 {
            guest_ops |= (1 << BenchOp::PagefaultBatch8 as u32) | (1 << BenchOp::PagefaultBatch32 as u32);
        }
        let paths = paths.iter().fold(0u64, |m, p| m | 1 << p.path() as u32);
        Selection { guest_ops, host_ops, paths, echo_vms, idle_rings, iters }
    }

    /// The default run's selection.
    pub fn default_run() -> Selection {
        Selection::new(&DEFAULT_OPS, &DEFAULT_PATHS, DEFAULT_ECHO_VMS, 0, None)
    }

    /// Whether path `p` is selected.
    pub fn wants(&self, p: BenchPath) -> bool {
        self.paths & (1 << p as u32) != 0
    }

    /// Guest-timed (op, path) pairs, in table order.
    fn guest_pairs(&self) -> impl Iterator<Item = (BenchOp, BenchPath)> + '_ {
        BenchOp::ALL
            .into_iter()
            .filter(|op| self.guest_ops & (1 << *op as u32) != 0)
            .flat_map(move |op| BenchPath::ALL.into_iter().map(move |p| (op, p)))
            .filter(|(op, p)| self.wants(*p) && op.has_path(*p))
    }

    /// A host-timed op's series: label (`echo-4vm` for the multi-VM run),
    /// VM count and the paths it has, in run order.
    pub fn host_series(&self) -> Vec<(String, usize, Vec<BenchPath>)> {
        let mut out = Vec::new();
        for &op in &self.host_ops {
            let paths: Vec<BenchPath> = match op {
                OpChoice::Irq => vec![BenchPath::Sidecall, BenchPath::Kernel],
                _ => vec![BenchPath::Sidecall, BenchPath::User],
            };
            let paths: Vec<BenchPath> = paths.into_iter().filter(|p| self.wants(*p)).collect();
            let vm_counts = if op == OpChoice::Echo && self.echo_vms > 1 { vec![1, self.echo_vms] } else { vec![1] };
            for vms in vm_counts {
                let label = if vms > 1 { format!("{}-{vms}vm", op.name()) } else { op.name().to_string() };
                out.push((label, vms, paths.clone()));
            }
        }
        out
    }

    /// Samples per host-timed series.
    pub fn host_iters(&self) -> usize {
        usize::try_from(self.iters.unwrap_or(HOST_DEFAULT_ITERS).clamp(100, 1_000_000)).unwrap_or(10_000)
    }

    /// The report's aggregate (op, path) rows, in the order the report
    /// lists them (per-vCPU rows and the floor aside). The guest skips the
    /// sidecall path when no sidecore serves it, which `sidecore bench`
    /// always starts when the path is selected.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for (op, p) in self.guest_pairs() {
            rows.push((op.name().to_string(), p.name().to_string()));
            if p == BenchPath::Sidecall && self.idle_rings > 0 {
                rows.push((op.name().to_string(), format!("sidecall+{}idle", self.idle_rings)));
            }
            if p == BenchPath::Sidecall {
                // Measured beside its sidecall blocks (not when the vCPU
                // shares the sidecore's CPU).
                rows.push((op.name().to_string(), BenchPath::GuestFloor.name().to_string()));
            }
        }
        let mut host: Vec<(String, BenchPath)> = self
            .host_series()
            .into_iter()
            .flat_map(|(label, _, paths)| paths.into_iter().map(move |p| (label.clone(), p)))
            .collect();
        // The report sorts host series by op label, then path.
        host.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        rows.extend(host.into_iter().map(|(label, p)| (label, p.name().to_string())));
        rows
    }

    /// Samples the run will take (a progress bar's length): the guest's
    /// per vCPU, plus the host-timed ones. An estimate where the page-table
    /// pool bounds the page-table ops below `--iters`.
    pub fn expected_samples(&self, vcpus: u32) -> u64 {
        let guest: u64 = self
            .guest_pairs()
            .map(|(op, _)| match (self.iters, op) {
                (Some(n), _) => n,
                (None, BenchOp::Null | BenchOp::Cpuid) => GUEST_DEFAULT_ITERS,
                (None, _) => GUEST_DEFAULT_PT_ITERS,
            })
            .sum();
        let host_series: usize = self.host_series().iter().map(|(_, _, p)| p.len()).sum();
        let host = (self.host_iters() as u64).saturating_mul(host_series as u64);
        guest.saturating_mul(u64::from(vcpus.max(1))).saturating_add(host)
    }
}

/// The aggregate (op, path) rows of a default `sidecore bench`.
pub fn default_rows() -> Vec<(String, String)> {
    Selection::default_run().rows()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rows_cover_every_op_and_only_its_paths() {
        let rows = default_rows();
        let has = |op: &str, path: &str| rows.iter().any(|(o, p)| o == op && p == path);
        assert!(has("null", "kernel") && has("null", "user") && has("null", "sidecall"));
        assert!(!has("pte", "kernel"), "pte has no kernel path");
        assert!(has("pagefault-batch8", "sidecall") && !has("pagefault-batch8", "user"));
        assert!(has("irq", "kernel") && has("irq", "sidecall") && !has("irq", "user"));
        assert!(has("echo", "user") && has("echo-4vm", "sidecall"));
        let mut dedup = rows.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), rows.len(), "no row twice: {rows:?}");
    }

    #[test]
    fn selection_counts_samples_and_idle_rows() {
        let s = Selection::new(&[OpChoice::Null, OpChoice::Irq], &[PathChoice::Sidecall], 1, 8, Some(1000));
        assert_eq!(
            s.rows(),
            vec![
                ("null".to_string(), "sidecall".to_string()),
                ("null".to_string(), "sidecall+8idle".to_string()),
                ("null".to_string(), "guest-floor".to_string()),
                ("irq".to_string(), "sidecall".to_string()),
            ]
        );
        // Two vCPUs time null each; irq is timed once by the host.
        assert_eq!(s.expected_samples(2), 2 * 1000 + 1000);
        let names: Vec<&str> = DEFAULT_OPS.iter().map(|o| o.name()).collect();
        assert_eq!(names, ["null", "cpuid", "pte", "pagefault", "irq", "echo"]);
    }
}
