//! Measures the floor on its own: a cache-line ping-pong between this
//! thread (pinned to the last CPU) and a sidecore (pinned to the first),
//! exactly as `sidecore bench` interleaves it. Prints the median in ns.
//!
//! `cargo run --release -p sidecore-core --example floor [SAMPLES]`

use sidecore_core::{Sidecore, SidecoreConfig};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sc = match Sidecore::spawn(
        SidecoreConfig { cpu: 0, name: "sidecore0".into(), idle_park: None, on_start: None },
        Vec::new(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("floor: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = sidecore_core::pin::pin_current_thread(cpus - 1) {
        eprintln!("floor: {e}");
        std::process::exit(1);
    }
    let t0 = std::time::Instant::now();
    let c0 = sidecore_core::tsc::rdtsc();
    let mut samples = vec![0u64; n];
    for chunk in samples.chunks_mut(1000) {
        sc.floor_block(chunk);
    }
    let cycles_per_ns = (sidecore_core::tsc::rdtsc() - c0) as f64 / t0.elapsed().as_nanos() as f64;
    samples.sort_unstable();
    let p50 = samples[n / 2] as f64 / cycles_per_ns;
    let p99 = samples[n * 99 / 100] as f64 / cycles_per_ns;
    println!("floor: {n} round trips, p50 {p50:.0} ns, p99 {p99:.0} ns (TSC {cycles_per_ns:.3} GHz)");
}
