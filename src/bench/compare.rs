//! `sidecore bench --compare A.json B.json`: two results side by side, the
//! percentiles recomputed from each series' histogram, and what differs in
//! how they were measured.

use hdrhistogram::Histogram;
use sidecore_core::tsc::TscRate;

use super::{histogram_codec, BenchReport, ResultRow};

/// A series' histogram in a result file cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("result {which}: series {op} / {path}{}: bad histogram", vcpu.map(|v| format!(" vCPU {v}")).unwrap_or_default())]
pub struct CompareError {
    /// `A` or `B`.
    pub which: &'static str,
    /// The series' op.
    pub op: String,
    /// Its path.
    pub path: String,
    /// Its vCPU.
    pub vcpu: Option<u32>,
    /// Why.
    #[source]
    pub source: histogram_codec::CodecError,
}

/// Percentiles recomputed from a series' histogram, in ns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recomputed {
    /// Median.
    pub p50_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// Samples.
    pub samples: u64,
}

/// One series in both results.
#[derive(Clone, Debug, PartialEq)]
pub struct CompareRow {
    /// Op.
    pub op: String,
    /// Path (with ` vN` for a per-vCPU series).
    pub path: String,
    /// In A.
    pub a: Recomputed,
    /// In B.
    pub b: Recomputed,
}

/// Two results compared.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Series in both, in A's order (the floor last).
    pub rows: Vec<CompareRow>,
    /// Series only in A (op, path).
    pub only_a: Vec<(String, String)>,
    /// Series only in B.
    pub only_b: Vec<(String, String)>,
    /// Provenance fields that differ: name, A's, B's.
    pub differences: Vec<(&'static str, String, String)>,
    /// A's and B's one-line provenance.
    pub described: (String, String),
}

fn recompute(h: &Histogram<u64>, tsc: TscRate) -> Recomputed {
    Recomputed { p50_ns: tsc.ns(h.value_at_quantile(0.5)), p99_ns: tsc.ns(h.value_at_quantile(0.99)), samples: h.len() }
}

fn label(r: &ResultRow) -> String {
    match r.vcpu {
        Some(v) => format!("{} v{v}", r.path),
        None => r.path.clone(),
    }
}

/// Matches `a`'s and `b`'s series by (op, path, vCPU) and recomputes their
/// p50 and p99 from the histograms; the floors are compared too.
pub fn compare(a: &BenchReport, b: &BenchReport) -> Result<Comparison, CompareError> {
    let decode = |which: &'static str, r: &ResultRow| {
        histogram_codec::decode(&r.histogram).map_err(|source| CompareError {
            which,
            op: r.op.clone(),
            path: r.path.clone(),
            vcpu: r.vcpu,
            source,
        })
    };
    let (tsc_a, tsc_b) = (TscRate::from_khz(a.tsc_khz), TscRate::from_khz(b.tsc_khz));
    let key = |r: &ResultRow| (r.op.clone(), r.path.clone(), r.vcpu);
    let mut rows = Vec::new();
    let mut only_a = Vec::new();
    for ra in &a.results {
        match b.results.iter().find(|rb| key(rb) == key(ra)) {
            Some(rb) => rows.push(CompareRow {
                op: ra.op.clone(),
                path: label(ra),
                a: recompute(&decode("A", ra)?, tsc_a),
                b: recompute(&decode("B", rb)?, tsc_b),
            }),
            None => only_a.push((ra.op.clone(), label(ra))),
        }
    }
    let only_b = b
        .results
        .iter()
        .filter(|rb| !a.results.iter().any(|ra| key(ra) == key(rb)))
        .map(|rb| (rb.op.clone(), label(rb)))
        .collect();
    if !a.floor_histogram.is_empty() && !b.floor_histogram.is_empty() {
        let floor = |which: &'static str, text: &str| {
            histogram_codec::decode(text).map_err(|source| CompareError {
                which,
                op: "floor".into(),
                path: "host".into(),
                vcpu: None,
                source,
            })
        };
        rows.push(CompareRow {
            op: "floor".into(),
            path: "host".into(),
            a: recompute(&floor("A", &a.floor_histogram)?, tsc_a),
            b: recompute(&floor("B", &b.floor_histogram)?, tsc_b),
        });
    }
    Ok(Comparison {
        rows,
        only_a,
        only_b,
        differences: a.provenance.differences(&b.provenance),
        described: (a.provenance.describe(), b.provenance.describe()),
    })
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 {
        format!("{:.2}", b / a)
    } else {
        "-".into()
    }
}

impl Comparison {
    /// The table for stdout; `names` are A's and B's file names.
    pub fn table(&self, names: (&str, &str)) -> String {
        let mut s = format!("A: {}\n   {}\nB: {}\n   {}\n", names.0, self.described.0, names.1, self.described.1);
        if self.differences.is_empty() {
            s += "provenance: same build, kernel, CPU and placement\n";
        } else {
            s += "provenance differs:\n";
            for (field, a, b) in &self.differences {
                s += &format!("  {field:<15} A {a}\n  {:<15} B {b}\n", "");
            }
        }
        s += &format!(
            "\n{:<18} {:<17} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7}\n",
            "op", "path", "p50 A ns", "p50 B ns", "B/A", "p99 A ns", "p99 B ns", "B/A"
        );
        for r in &self.rows {
            s += &format!(
                "{:<18} {:<17} {:>9.0} {:>9.0} {:>7} {:>9.0} {:>9.0} {:>7}\n",
                r.op,
                r.path,
                r.a.p50_ns,
                r.b.p50_ns,
                ratio(r.a.p50_ns, r.b.p50_ns),
                r.a.p99_ns,
                r.b.p99_ns,
                ratio(r.a.p99_ns, r.b.p99_ns)
            );
        }
        for (which, only) in [("A", &self.only_a), ("B", &self.only_b)] {
            if !only.is_empty() {
                let list: Vec<String> = only.iter().map(|(op, path)| format!("{op} / {path}")).collect();
                s += &format!("only in {which}: {}\n", list.join(", "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BenchCollector, ReportHeader};
    use super::*;

    fn report(scale: u64, with_cpuid: bool) -> BenchReport {
        let c = BenchCollector::new(1_000_000, None); // 1 GHz: 1 cycle = 1 ns
        let samples: Vec<u64> = (0..1000).map(|i| scale * (100 + i % 10)).collect();
        c.add_host_series("irq", "sidecall", &samples);
        if with_cpuid {
            c.add_host_series("echo", "user", &samples);
        }
        c.add_host_floor("irq", &[50, 60, 70]);
        c.report(ReportHeader {
            backend: "pvm".into(),
            vcpu_cpu: 1,
            vcpu_cpus: vec![1],
            sidecore_cpu: 0,
            timing_representative: true,
            execution: "native".into(),
        })
    }

    #[test]
    fn ratios_come_from_the_histograms() {
        let (mut a, b) = (report(1, true), report(2, false));
        // Copied figures must not be what is compared.
        a.results[0].stat.p50_ns = 1.0;
        let c = compare(&a, &b).unwrap();
        let irq = c.rows.iter().find(|r| r.op == "irq").unwrap();
        assert!((irq.a.p50_ns - 104.0).abs() < 1.0, "{irq:?}");
        assert!((irq.b.p50_ns / irq.a.p50_ns - 2.0).abs() < 0.02, "{irq:?}");
        assert_eq!(c.only_a, vec![("echo".to_string(), "user".to_string())]);
        assert!(c.rows.iter().any(|r| r.op == "floor"));
        let t = c.table(("a.json", "b.json"));
        assert!(t.lines().any(|l| l.starts_with("irq ") && l.contains(" 2.00")), "{t}");
    }

    #[test]
    fn bad_histogram_names_the_series() {
        let (mut a, b) = (report(1, false), report(1, false));
        a.results[0].histogram = "####".into();
        let e = compare(&a, &b).unwrap_err();
        assert_eq!((e.which, e.op.as_str()), ("A", "irq"));
    }
}
