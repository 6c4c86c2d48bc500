//! `sidecore bench`'s JSON and the commands that read it, without a guest:
//! result files are made by the library's own serialiser from fabricated
//! samples, then `bench --compare` and `bench --render-readme` read them.
//! Also the usage errors clap catches before anything runs.

use std::path::PathBuf;
use std::process::{Command, Output};

use sidecore_vmm::bench::{BenchCollector, BenchReport, ReportHeader, SCHEMA};

fn sidecore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sidecore")).args(args).output().expect("run sidecore")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sidecore-bench-json-{}-{name}", std::process::id()))
}

/// A result file as `sidecore bench --json` writes it, with `scale` times
/// the latencies.
fn fabricated(name: &str, scale: u64) -> PathBuf {
    let c = BenchCollector::new(2_000_000, None); // 2 GHz: 2 cycles = 1 ns
    let samples: Vec<u64> = (0..5000).map(|i| scale * (800 + i % 400)).collect();
    c.add_host_series("irq", "sidecall", &samples);
    c.add_host_series("irq", "kernel", &samples.iter().map(|s| s * 10).collect::<Vec<_>>());
    c.add_host_floor("irq", &[200, 240, 260]);
    let rep = c.report(ReportHeader {
        backend: "pvm".into(),
        vcpu_cpu: 1,
        vcpu_cpus: vec![1],
        sidecore_cpu: 0,
        timing_representative: true,
        execution: "natively".into(),
    });
    let path = temp(name);
    std::fs::write(&path, serde_json::to_string_pretty(&rep).expect("encode")).expect("write");
    path
}

#[test]
fn written_json_has_schema_provenance_and_histograms() {
    let path = fabricated("schema.json", 1);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["schema"], SCHEMA);
    let p = &v["provenance"];
    for field in ["sidecore_version", "git_commit", "backend", "kernel_release", "cpu_model", "timestamp_utc"] {
        assert!(p[field].as_str().is_some_and(|s| !s.is_empty()), "provenance.{field}: {p}");
    }
    assert_eq!(p["representative"], true);
    assert_eq!(p["tsc_khz"], 2_000_000);
    assert!(p["command_line"].as_array().is_some_and(|a| !a.is_empty()));
    for r in v["results"].as_array().unwrap() {
        assert!(r["histogram"].as_str().is_some_and(|h| h.len() > 8), "{r}");
    }
    // And it loads back with the same percentiles it was written with.
    let rep = BenchReport::load(&path).unwrap();
    let h = sidecore_vmm::bench::histogram_codec::decode(&rep.results[0].histogram).unwrap();
    assert!((h.value_at_quantile(0.5) as f64 / 2.0 - rep.results[0].stat.p50_ns).abs() < 1e-6);
    let _ = std::fs::remove_file(path);
}

#[test]
fn compare_prints_ratio_rows() {
    let (a, b) = (fabricated("a.json", 1), fabricated("b.json", 3));
    let o = sidecore(&["bench", "--compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    let row = out.lines().find(|l| l.starts_with("irq ") && l.contains("sidecall")).expect(&out);
    // B is three times A at every percentile.
    let ratios: Vec<&str> = row.split_whitespace().filter(|w| w.contains('.')).collect();
    assert_eq!(ratios.len(), 2, "{row}");
    for r in ratios {
        let x: f64 = r.parse().unwrap();
        assert!((x - 3.0).abs() < 0.05, "{row}");
    }
    assert!(out.lines().any(|l| l.starts_with("floor ")), "{out}");
    assert!(out.contains("provenance: same build"), "{out}");
    let _ = (std::fs::remove_file(a), std::fs::remove_file(b));
}

#[test]
fn compare_refuses_what_is_not_a_current_result() {
    let good = fabricated("good.json", 1);
    let other = temp("other.json");
    std::fs::write(&other, r#"{"name": "not a bench result"}"#).unwrap();
    let old = temp("old.json");
    std::fs::write(&old, r#"{"backend": "pvm", "tsc_khz": 1, "floor": {}, "results": []}"#).unwrap();
    let missing = temp("missing.json");
    for (file, want) in
        [(&other, "is not a sidecore bench result"), (&old, "schema sidecore-bench/1"), (&missing, "cannot read")]
    {
        let o = sidecore(&["bench", "--compare", good.to_str().unwrap(), file.to_str().unwrap()]);
        let (out, err) = text(&o);
        // A file that is not what it must be is a runtime failure (1), not
        // a usage error (2).
        assert_eq!(o.status.code(), Some(1), "{file:?} was compared:\n{out}");
        assert!(err.contains(want) && err.contains(file.to_str().unwrap()), "{file:?}: stderr:\n{err}");
    }
    let _ = (std::fs::remove_file(good), std::fs::remove_file(other), std::fs::remove_file(old));
}

#[test]
fn render_readme_prints_the_block_from_a_result() {
    let path = fabricated("readme.json", 1);
    let o = sidecore(&["bench", "--render-readme", path.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stderr:\n{err}");
    let inside = sidecore_vmm::bench::example_block::extract(&out).expect(&out);
    let rows = sidecore_vmm::bench::example_block::table_rows(inside);
    assert_eq!(rows, vec![("irq".to_string(), "kernel".to_string()), ("irq".to_string(), "sidecall".to_string())]);
    let _ = std::fs::remove_file(path);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["bench", "--iters", "0"][..],
        &["bench", "--block", "0"],
        &["bench", "--block", "5000"],
        &["bench", "--warmup", "0"],
        &["bench", "--ops", "null,bogus"],
        &["bench", "--paths", "kernel,nowhere"],
        &["bench", "--compare", "only-one.json"],
    ] {
        let o = sidecore(args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: stderr:\n{err}");
        // clap's own message, not a runtime failure.
        assert!(err.starts_with("error: ") && err.contains("--help"), "{args:?} is not a usage error:\n{err}");
    }
    let o = sidecore(&["bench", "--help"]);
    let (help, _) = text(&o);
    for value in ["pagefault", "sidecall", "irq", "echo"] {
        assert!(help.contains(value), "--help does not list {value}:\n{help}");
    }
}
