//! Where and when a bench result was measured, and by what: kept in the JSON
//! so two results can be told apart (`sidecore bench --compare`) and the
//! README's example says which machine its figures are from.

use serde::{Deserialize, Serialize};

/// What produced a bench result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The sidecore crate's version.
    pub sidecore_version: String,
    /// The build's git commit ([`crate::build_commit`]).
    pub git_commit: String,
    /// KVM backend (pvm, vmx, svm).
    pub backend: String,
    /// The host kernel's release (`uname -r`).
    pub kernel_release: String,
    /// The host CPU (`model name` in /proc/cpuinfo).
    pub cpu_model: String,
    /// TSC frequency used for ns.
    pub tsc_khz: u64,
    /// The sidecore's CPU.
    pub sidecore_cpu: usize,
    /// Every vCPU's CPU.
    pub vcpu_cpus: Vec<usize>,
    /// The command line, program name first.
    pub command_line: Vec<String>,
    /// When the report was made, UTC, RFC 3339.
    pub timestamp_utc: String,
    /// Whether guests ran natively (false nested under an emulator such as
    /// the AMD-V bed's QEMU TCG, or with KVM emulating every instruction):
    /// only then do the figures mean anything.
    pub representative: bool,
}

impl Provenance {
    /// This process's provenance for a run with these facts.
    pub fn collect(
        backend: &str,
        tsc_khz: u64,
        sidecore_cpu: usize,
        vcpu_cpus: &[usize],
        representative: bool,
    ) -> Provenance {
        Provenance {
            sidecore_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: crate::build_commit().to_string(),
            backend: backend.to_string(),
            kernel_release: kernel_release(),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| cpu_model_in(&t))
                .unwrap_or_else(|| "unknown".into()),
            tsc_khz,
            sidecore_cpu,
            vcpu_cpus: vcpu_cpus.to_vec(),
            command_line: std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect(),
            timestamp_utc: utc_now_rfc3339(),
            representative,
        }
    }

    /// The fields in which `self` and `other` differ: (name, self's, other's).
    /// The timestamp and command line are left out: they always differ.
    pub fn differences(&self, other: &Provenance) -> Vec<(&'static str, String, String)> {
        let cpus = |p: &Provenance| {
            format!(
                "sidecore {}, vCPU {}",
                p.sidecore_cpu,
                p.vcpu_cpus.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            )
        };
        let fields: [(&'static str, String, String); 8] = [
            ("version", self.sidecore_version.clone(), other.sidecore_version.clone()),
            ("commit", self.git_commit.clone(), other.git_commit.clone()),
            ("backend", self.backend.clone(), other.backend.clone()),
            ("kernel", self.kernel_release.clone(), other.kernel_release.clone()),
            ("CPU", self.cpu_model.clone(), other.cpu_model.clone()),
            ("TSC kHz", self.tsc_khz.to_string(), other.tsc_khz.to_string()),
            ("CPUs", cpus(self), cpus(other)),
            ("representative", self.representative.to_string(), other.representative.to_string()),
        ];
        fields.into_iter().filter(|(_, a, b)| a != b).collect()
    }

    /// One line: when, what build, what machine.
    pub fn describe(&self) -> String {
        format!(
            "{} — sidecore {} ({}), {} backend, kernel {}, {}, TSC {} kHz, vCPU{} on CPU {}, sidecore on CPU {}{}",
            self.timestamp_utc,
            self.sidecore_version,
            self.git_commit,
            self.backend,
            self.kernel_release,
            self.cpu_model,
            self.tsc_khz,
            if self.vcpu_cpus.len() > 1 { "s" } else { "" },
            self.vcpu_cpus.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            self.sidecore_cpu,
            if self.representative { "" } else { " — NOT REPRESENTATIVE (guests did not run natively)" }
        )
    }
}

/// The host kernel's release, or `unknown`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The first `model name` of a /proc/cpuinfo text.
pub fn cpu_model_in(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

/// Now, UTC, RFC 3339 (`2026-12-03T11:50:43.123456Z`).
pub fn utc_now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_model_is_the_first_model_name() {
        let t = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)   CPU @ 2.60GHz\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model_in(t).as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.60GHz"));
        assert_eq!(cpu_model_in("processor : 0\n"), None);
    }

    #[test]
    fn timestamp_is_rfc3339_utc() {
        let t = utc_now_rfc3339();
        let parsed = time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).unwrap();
        assert_eq!(parsed.offset(), time::UtcOffset::UTC);
        assert!(parsed.year() >= 2024, "{t}");
    }

    #[test]
    fn differences_leave_out_time_and_command() {
        let a = Provenance::collect("pvm", 2_600_000, 0, &[1], true);
        let mut b = a.clone();
        b.timestamp_utc = "2000-01-01T00:00:00Z".into();
        b.command_line = vec!["x".into()];
        assert!(a.differences(&b).is_empty());
        b.git_commit = "abc1234-dirty".into();
        b.representative = false;
        let d = a.differences(&b);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), ["commit", "representative"]);
    }
}
