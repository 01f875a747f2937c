//! Which path is fastest on *your* CPU: the table a user benchmarks ndlora's own kernels
//! against BLAS with, printed and drawn as an SVG plot.
//!
//! ```sh
//! cargo run --release --example paths            # writes target/paths.svg
//! ```
//!
//! * MicroLora per-vector forward at every SIMD level this CPU runs, the scalar loop, and the
//!   BLAS batch path (`forward_batch`), in ns per vector.
//! * `LoraLayer::forward_into` (unmerged, r = 16, f32) at n ∈ {1, 2, 4, 8, 16, 32, 64, 256}
//!   rows for d = k ∈ {1024, 4096}, beside a bare BLAS gemv per row and a bare BLAS gemm of
//!   X Wᵀ, with GB/s of W read (n ≤ 8, where a forward is bound by reading W) or GFLOP/s of
//!   the base product; and the crossover: the smallest n from which the bare gemm beats
//!   ndlora's forward.
//!
//! One thread throughout (`ndlora::set_blas_threads(1)`). Each cell is the median of 7 timed
//! batches of at least 20 ms each; the machine's other load is noise (rerun to see it).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use ndarray::{Array2, Axis};
use ndlora::{LoraConfig, LoraLayer, MicroLora, SimdLevel};

#[path = "../benches/common/baselines.rs"]
mod baselines;
use baselines::{bare_gemm, bare_gemv, stream_read};

/// Median over 7 batches of the time per call of `f`, each batch ≥ 20 ms.
fn time(mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_nanos(20));
    let reps = (Duration::from_millis(20).as_nanos() / once.as_nanos()).clamp(1, 1_000_000) as u32;
    let mut batches: Vec<Duration> = (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed() / reps
        })
        .collect();
    batches.sort();
    batches[3]
}

fn random(seed: u64, rows: usize, cols: usize) -> Array2<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array2::from_shape_simple_fn((rows, cols), || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

fn micro_table() {
    println!("\nMicroLora per-vector forward, ns per vector");
    let levels: Vec<SimdLevel> = [SimdLevel::Avx512F, SimdLevel::Avx2Fma, SimdLevel::Neon]
        .into_iter()
        .filter(|l| l.is_available())
        .collect();
    let mut header = String::from("|    H | r |");
    for l in &levels {
        write!(header, " {:>9} |", l.to_string()).unwrap();
    }
    header.push_str("    scalar | batch b=1 | batch b=32 |");
    println!("{header}");
    for h in [256, 1024, 4096] {
        for rank in [1, 2] {
            let mut lora = MicroLora::new(h, rank);
            let down = lora.get_weights().0.to_owned();
            lora.set_weights(down.view(), random(2, rank, h).view())
                .expect("finite");
            let x: Vec<f32> = random(3, 1, h).into_raw_vec_and_offset().0;
            let mut y = vec![0.0f32; h];
            let mut row = format!("| {h:>4} | {rank} |");
            for &l in &levels {
                let t = time(|| {
                    lora.forward_with(l, black_box(&x), black_box(&mut y))
                        .unwrap()
                });
                write!(row, " {:>9.0} |", t.as_nanos()).unwrap();
            }
            let t = time(|| lora.forward_scalar(black_box(&x), black_box(&mut y)));
            write!(row, " {:>9.0} |", t.as_nanos()).unwrap();
            for b in [1, 32] {
                let xs = random(4, b, h);
                let mut ys = Array2::zeros((b, h));
                let t = time(|| lora.forward_batch(xs.view(), ys.view_mut()).unwrap());
                write!(row, " {:>9.0} |", t.as_nanos() as f64 / b as f64).unwrap();
            }
            println!("{row}");
        }
    }
}

/// One measured forward cell: µs per call for ndlora, per-row gemv and gemm.
struct Cell {
    n: usize,
    ndlora: Duration,
    gemv: Duration,
    gemm: Duration,
}

fn forward_table(dk: usize) -> (Vec<Cell>, Duration) {
    let r = 16;
    let config = LoraConfig {
        rank: r,
        alpha: 32.0,
        ..Default::default()
    };
    let w = random(5, dk, dk);
    let layer =
        LoraLayer::from_parts(w.clone(), random(6, r, dk), random(7, dk, r), config).unwrap();
    let read = time(|| {
        black_box(stream_read(w.as_slice().unwrap()));
    });
    let bytes = (dk * dk * 4) as f64;
    println!(
        "\nforward, d = k = {dk}, r = {r}, f32 (one streaming read of W: {:.0} µs, {:.1} GB/s)",
        read.as_secs_f64() * 1e6,
        bytes / read.as_secs_f64() / 1e9
    );
    println!("|   n | ndlora forward_into | BLAS gemv per row | BLAS gemm | fastest |");
    let mut cells = Vec::new();
    for n in [1, 2, 4, 8, 16, 32, 64, 256] {
        let x = random(8 + n as u64, n, dk);
        let mut y = Array2::zeros((n, dk));
        let ndlora = time(|| layer.forward_into(x.view(), y.view_mut()).unwrap());
        let gemv = time(|| {
            for (xr, yr) in x.axis_iter(Axis(0)).zip(y.axis_iter_mut(Axis(0))) {
                bare_gemv(w.view(), xr, yr);
            }
        });
        let gemm = time(|| bare_gemm(&x, &w, &mut y));
        let rate = |t: Duration| {
            if n <= 8 {
                format!("{:.1} GB/s", bytes / t.as_secs_f64() / 1e9)
            } else {
                format!(
                    "{:.1} GFLOP/s",
                    2.0 * (n * dk * dk) as f64 / t.as_secs_f64() / 1e9
                )
            }
        };
        let cell = |t: Duration| format!("{:.0} µs ({})", t.as_secs_f64() * 1e6, rate(t));
        let fastest = [("ndlora", ndlora), ("gemv", gemv), ("gemm", gemm)]
            .into_iter()
            .min_by_key(|(_, t)| *t)
            .unwrap()
            .0;
        println!(
            "| {n:>3} | {} | {} | {} | {fastest} |",
            cell(ndlora),
            cell(gemv),
            cell(gemm)
        );
        cells.push(Cell {
            n,
            ndlora,
            gemv,
            gemm,
        });
    }
    match cells.iter().find(|c| c.gemm < c.ndlora) {
        Some(c) => println!(
            "crossover: a bare gemm beats ndlora's forward from n = {}",
            c.n
        ),
        None => println!("crossover: none up to n = 256 (ndlora's forward is never slower)"),
    }
    (cells, read)
}

/// A plotted line: name, colour and the time it takes from a cell.
type Series = (&'static str, &'static str, fn(&Cell) -> Duration);

/// A log-log line plot of µs per call against n, one panel per d = k.
fn svg(panels: &[(usize, Vec<Cell>, Duration)]) -> String {
    let (w, h, pad) = (520.0, 360.0, 60.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{h}" font-family="sans-serif" font-size="12">"#,
        w * panels.len() as f64
    );
    for (p, (dk, cells, read)) in panels.iter().enumerate() {
        let x0 = p as f64 * w;
        let all = cells.iter().flat_map(|c| [c.ndlora, c.gemv, c.gemm]);
        let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), t| {
            let us = t.as_secs_f64() * 1e6;
            (lo.min(us), hi.max(us))
        });
        let (lo, hi) = (lo.min(read.as_secs_f64() * 1e6).log10(), hi.log10());
        let px = |n: usize| x0 + pad + (n as f64).log2() / 8.0 * (w - 2.0 * pad);
        let py = |us: f64| h - pad - (us.log10() - lo) / (hi - lo).max(1e-9) * (h - 2.0 * pad);
        write!(
            s,
            r#"<text x="{}" y="20">d = k = {dk}, r = 16, f32, 1 thread: µs per call (log) vs n (log)</text>"#,
            x0 + pad
        )
        .unwrap();
        write!(
            s,
            r#"<rect x="{}" y="{pad}" width="{}" height="{}" fill="none" stroke="black"/>"#,
            x0 + pad,
            w - 2.0 * pad,
            h - 2.0 * pad
        )
        .unwrap();
        for decade in (lo.ceil() as i32)..=(hi.floor() as i32) {
            let us = 10f64.powi(decade);
            write!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{us} µs</text>"#,
                x0 + pad - 4.0,
                py(us) + 4.0
            )
            .unwrap();
        }
        for c in cells {
            write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                px(c.n),
                h - pad + 16.0,
                c.n
            )
            .unwrap();
        }
        let series: [Series; 3] = [
            ("ndlora", "#d62728", |c| c.ndlora),
            ("BLAS gemv", "#1f77b4", |c| c.gemv),
            ("BLAS gemm", "#2ca02c", |c| c.gemm),
        ];
        for (i, (name, color, get)) in series.iter().enumerate() {
            let points: Vec<String> = cells
                .iter()
                .map(|c| format!("{:.1},{:.1}", px(c.n), py(get(c).as_secs_f64() * 1e6)))
                .collect();
            let ly = pad + 16.0 * (i + 1) as f64;
            write!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{color}" stroke-width="3"/><text x="{}" y="{ly}">{name}</text>"#,
                points.join(" "),
                x0 + pad + 8.0,
                x0 + pad + 28.0,
                ly - 4.0,
                ly - 4.0,
                x0 + pad + 34.0,
            )
            .unwrap();
        }
        let floor = py(read.as_secs_f64() * 1e6);
        write!(
            s,
            r##"<line x1="{}" x2="{}" y1="{floor:.1}" y2="{floor:.1}" stroke="#777" stroke-dasharray="4"/><text x="{}" y="{:.1}" fill="#777">one read of W</text>"##,
            x0 + pad,
            x0 + w - pad,
            x0 + w - pad - 90.0,
            floor - 4.0
        )
        .unwrap();
    }
    s.push_str("</svg>\n");
    s
}

fn main() {
    ndlora::set_blas_threads(1);
    // SAFETY: nothing else runs yet; no other thread calls BLAS or touches the environment.
    if let Some(core) = unsafe { ndlora::use_native_openblas_kernel() } {
        println!("switched OpenBLAS to its {core} kernel");
    }
    println!("ndlora paths on {}", cpu_model());
    println!("backend: {}", ndlora::backend());
    println!("SIMD level: {}", ndlora::simd_level());
    micro_table();
    let panels: Vec<_> = [1024, 4096]
        .into_iter()
        .map(|dk| {
            let (cells, read) = forward_table(dk);
            (dk, cells, read)
        })
        .collect();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/paths.svg");
    match std::fs::write(&out, svg(&panels)) {
        Ok(()) => println!("\nplot: {}", out.display()),
        Err(e) => println!("\nplot not written ({}): {e}", out.display()),
    }
}
