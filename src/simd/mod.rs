//! Hand-vectorised kernels, chosen at run time: [`MicroLora`](crate::MicroLora)'s forward,
//! the fused rank-r update behind [`LoraLayer::merge`](crate::LoraLayer::merge), and the
//! skinny product behind forwards of at most [`N_SKINNY`](crate::N_SKINNY) rows.
//!
//! The forward kernel computes y ← y + s·Uᵀ (D x) for a rank-1 or rank-2 adapter: the r dot
//! products h = D x in one pass over x, then the fused update y ← y + Σⱼ (s·hⱼ)·Uⱼ in a
//! second pass. The merge kernel ([`rank_update`]) computes W ← W + α·B A, register-tiled.
//! The skinny product ([`decode`]) computes Y = Σₛ Xₛ Wₛᵀ + b for a few rows of X, reading
//! W once, register-tiled over rows of W and of X.
//!
//! * [`vector`] is the vector abstraction both bodies are written against (`Vector`, over
//!   `f32` or `f64`) and its portable `[T; L]` implementation.
//! * [`lanes`] holds the kernel body once, generic over a vector type (`Lanes`): independent
//!   accumulators, body/vector/scalar tail, unaligned loads. [`x86`] instantiates it with
//!   AVX2+FMA intrinsics (`__m256`) and AVX-512F intrinsics (`__m512`), `aarch64.rs` with
//!   NEON intrinsics. One body means the AVX-512 and NEON builds run the logic the AVX2
//!   tests exercise; the 16- and 4-lane widths also run on any host in this module's unit
//!   tests (as portable vectors). `tests/codegen.rs` disassembles the x86-64 kernels and
//!   checks that each uses its ISA's FMAs and no gathers or scatters.
//! * [`scalar`] is the portable fallback and the `forward_scalar` reference.
//! * A half-precision W (`bf16`, `f16` layers, f32 sums): the skinny product and the merge
//!   update are the same bodies, generic over how W is stored (`vector::Stored`,
//!   `vector::WideLoad`): each vector of W is widened in registers as it is loaded (bf16 by
//!   a 16-bit shift, f16 by `vcvtph2ps`) and, in the merge, rounded once per element as it
//!   is stored. [`convert`] widens and rounds whole rows for the paths that hand f32 to BLAS.
//! * CPU features are detected once; the chosen [`Kernel`] (a function pointer) is cached in
//!   a `OnceLock`. [`Kernel::run`] is the one safe entry: it checks the slice lengths that the
//!   `unsafe` kernels rely on. The merge kernel's safe entry is
//!   [`rank_update::fused_rank_update`], the skinny product's [`decode::skinny_product`];
//!   both take views and check their shapes and strides.

use std::fmt;
use std::sync::OnceLock;

/// The kernel of a family for `level`: `$scalar` always, `$avx2` (an `Option`) and
/// `$avx512` on x86-64, `$neon` (an `Option`) on aarch64, `None` for a level this target
/// lacks. One dispatch shape for every kernel family (products, updates).
macro_rules! kernel_for_level {
    ($level:expr, $scalar:expr, $avx2:expr, $avx512:ident, $neon:expr) => {
        match $level {
            SimdLevel::Scalar => Some($scalar),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2Fma => $avx2,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512F => Some(super::x86::$avx512),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => $neon,
            #[allow(unreachable_patterns)]
            _ => None,
        }
    };
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
pub(crate) mod convert;
pub(crate) mod decode;
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64", test)),
    allow(dead_code)
)]
mod lanes;
mod parallel;
pub(crate) mod rank_update;
mod scalar;
pub(crate) mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use scalar::{add_term_wide, needs_wide_term};

/// The largest `bits & 0x7fff` over the bit patterns of 16-bit floats (bf16, f16, whose
/// sign is bit 15): their largest magnitude as a pattern, 0 when empty (see
/// [`vector::Element::max_abs_bits`]).
pub(crate) fn max_abs_bits_u16(bits: &[u16]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, just checked.
        return unsafe { x86::max_abs_bits_avx2_u16(bits) };
    }
    bits.iter().fold(0, |m, &b| m.max(b & 0x7fff))
}

/// The instruction-set variants of ndlora's own kernels: [`MicroLora`](crate::MicroLora)'s
/// forward and the fused merge/unmerge update of [`LoraLayer`](crate::LoraLayer) and
/// [`LoraModel`](crate::LoraModel).
///
/// [`simd_level`] says which one those kernels use on this CPU;
/// [`MicroLora::forward_with`](crate::MicroLora::forward_with) runs a given one.
///
/// ```
/// use ndlora::SimdLevel;
/// let level = ndlora::simd_level();
/// assert!(level.is_available());
/// assert!(SimdLevel::Scalar.is_available()); // always compiled, always runs
/// println!("MicroLora::forward runs the {level} kernel");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SimdLevel {
    /// Portable scalar loop (every CPU).
    Scalar,
    /// x86-64 with AVX2 and FMA: 8 lanes.
    Avx2Fma,
    /// x86-64 with AVX-512F: 16 lanes.
    Avx512F,
    /// aarch64 with NEON: 4 lanes.
    Neon,
}

impl SimdLevel {
    /// Every variant, from the most portable to the widest.
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Scalar,
        SimdLevel::Avx2Fma,
        SimdLevel::Avx512F,
        SimdLevel::Neon,
    ];

    /// A short name: `"scalar"`, `"avx2+fma"`, `"avx512f"` or `"neon"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Avx512F => "avx512f",
            SimdLevel::Neon => "neon",
        }
    }

    /// Whether this build and this CPU can run the variant.
    pub fn is_available(self) -> bool {
        Kernel::for_level(self).is_some()
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kernel variant ndlora's own kernels ([`MicroLora::forward`](crate::MicroLora::forward),
/// the fused merge) dispatch to on this CPU: the widest available of AVX-512F, AVX2+FMA, NEON,
/// else scalar. Detected on first use and cached for the life of the process.
///
/// ```
/// let level = ndlora::simd_level();
/// println!("{level}");
/// assert_eq!(level, ndlora::simd_level()); // cached
/// ```
pub fn simd_level() -> SimdLevel {
    Kernel::best().level
}

/// Whether this is an Intel CPU (CPUID vendor "GenuineIntel"): a few kernel choices that
/// measured differently on Intel and AMD cores (the skinny product's prefetch) follow it.
pub(crate) fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU. (`__cpuid` is a safe function in
        // recent Rust, `unsafe` in older releases that `rust-version` still admits.)
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        // "GenuineIntel" in EBX, EDX, ECX order.
        id.ebx == u32::from_le_bytes(*b"Genu")
            && id.edx == u32::from_le_bytes(*b"ineI")
            && id.ecx == u32::from_le_bytes(*b"ntel")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The adapter a kernel applies: row-major D (r×n) and U (r×n) as flat slices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Adapter<'a> {
    pub down: &'a [f32],
    pub up: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// y ← y + s·Uᵀ (D x).
///
/// # Safety
/// `a.rank` is 1 or 2, `a.down.len() == a.up.len() == a.rank * x.len()`, `y.len() == x.len()`,
/// and the CPU supports the instructions the kernel was compiled for.
type KernelFn = unsafe fn(a: Adapter<'_>, x: &[f32], y: &mut [f32]);

/// A forward kernel this CPU can run. Only [`Kernel::for_level`] makes one, after checking the
/// CPU's features, so holding a `Kernel` proves its instructions are supported.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    level: SimdLevel,
    f: KernelFn,
}

impl Kernel {
    const SCALAR: Kernel = Kernel {
        level: SimdLevel::Scalar,
        f: scalar::forward,
    };

    /// The kernel for `level`, if this build and CPU can run it.
    pub(crate) fn for_level(level: SimdLevel) -> Option<Kernel> {
        let f: KernelFn = match level {
            SimdLevel::Scalar => return Some(Self::SCALAR),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2Fma
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") =>
            {
                x86::forward_avx2_fma
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512F if is_x86_feature_detected!("avx512f") => x86::forward_avx512f,
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon if std::arch::is_aarch64_feature_detected!("neon") => {
                aarch64::forward_neon
            }
            _ => return None,
        };
        Some(Kernel { level, f })
    }

    /// The widest kernel this CPU runs, detected once.
    #[inline]
    pub(crate) fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            [SimdLevel::Avx512F, SimdLevel::Avx2Fma, SimdLevel::Neon]
                .into_iter()
                .find_map(Kernel::for_level)
                .unwrap_or(Self::SCALAR)
        })
    }

    /// The portable scalar kernel.
    pub(crate) fn scalar() -> Kernel {
        Self::SCALAR
    }

    /// y ← y + s·Uᵀ (D x) with this kernel.
    ///
    /// # Panics
    /// If the lengths are inconsistent (callers check first and report their own message).
    #[inline]
    pub(crate) fn run(self, a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        assert!(
            (a.rank == 1 || a.rank == 2)
                && a.down.len() == a.rank * n
                && a.up.len() == a.rank * n
                && y.len() == n,
            "MicroLora kernel: inconsistent lengths"
        );
        // SAFETY: the assert above establishes the length and rank preconditions of `KernelFn`;
        // `self` was built by `for_level`, which checked that the CPU has the kernel's features.
        unsafe { (self.f)(a, x, y) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised largest-magnitude passes against a plain loop in u64, over lengths
    /// around every vector width and unroll, with the largest value placed first, last and
    /// in the middle, negative, NaN and ∞ patterns among them.
    #[test]
    fn max_abs_bits_matches_a_plain_loop() {
        use super::vector::Element;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [0, 1, 7, 15, 16, 17, 33, 64, 127, 257, 1000] {
            for place in 0..3 {
                let mut bits: Vec<u16> = (0..len).map(|_| (next() % 0x7000) as u16).collect();
                let mut floats: Vec<f32> = (0..len)
                    .map(|_| f32::from_bits((next() % 0x7f00_0000) as u32))
                    .collect();
                if len > 0 {
                    let at = [0, len / 2, len - 1][place];
                    bits[at] = [0xfc00, 0xffff, 0x7f80][place]; // −∞ (f16), NaN, +∞ (bf16)
                    floats[at] = [-f32::INFINITY, f32::NAN, -1e38][place];
                }
                let want16 = bits.iter().map(|&b| u64::from(b & 0x7fff)).max();
                assert_eq!(
                    u64::from(max_abs_bits_u16(&bits)),
                    want16.unwrap_or(0),
                    "u16, {len}"
                );
                let want32 = floats
                    .iter()
                    .map(|v| u64::from(v.to_bits() & 0x7fff_ffff))
                    .max();
                assert_eq!(
                    f32::max_abs_bits(&floats),
                    want32.unwrap_or(0),
                    "f32, {len}"
                );
            }
        }
    }

    fn pattern(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.7548777).fract() - 0.5)
            .collect()
    }

    /// Runs the generic body at width `L` on this CPU and compares it with scalar.
    fn check_width(kernel: impl Fn(Adapter<'_>, &[f32], &mut [f32]), name: &str) {
        for rank in 1..=2 {
            for n in (0..=70).chain([130, 4099]) {
                let down = pattern(rank * n, 1.0);
                let up = pattern(rank * n, 2.0);
                let x = pattern(n, 3.0);
                let a = Adapter {
                    down: &down,
                    up: &up,
                    rank,
                    scale: 0.75,
                };
                let mut want = pattern(n, 4.0);
                let mut got = want.clone();
                Kernel::scalar().run(a, &x, &mut want);
                kernel(a, &x, &mut got);
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    let tol = 1e-5 * (1.0 + (n as f32).sqrt());
                    assert!(
                        (w - g).abs() <= tol,
                        "{name} rank {rank} n {n} i {i}: {g} vs scalar {w}"
                    );
                }
            }
        }
    }

    /// `len` elements starting `offset` elements past a 64-byte boundary, inside `buf`.
    fn placed(buf: &mut Vec<f32>, values: &[f32], offset: usize) -> std::ops::Range<usize> {
        buf.clear();
        buf.resize(values.len() + offset + 16, f32::NAN);
        let start = (64 - buf.as_ptr() as usize % 64) % 64 / 4 + offset;
        buf[start..start + values.len()].copy_from_slice(values);
        start..start + values.len()
    }

    /// Pass 2 realigned (U shifted into place, y on vector boundaries) gives the same bits as
    /// the plain pass, for every offset of y and of U from a line, at `LANES`-wide vectors;
    /// `kernel(a, x, y, realign)` runs one kernel both ways.
    fn check_realigned(
        kernel: impl Fn(Adapter<'_>, &[f32], &mut [f32], bool),
        lanes: usize,
        name: &str,
    ) {
        let mut ub = Vec::new();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        for rank in 1..=2 {
            for n in [2048, 2049, 2050, 2063, 2079, 2111, 4099] {
                assert!(n >= lanes::REALIGN_MIN_LEN);
                let down = pattern(rank * n, 1.0);
                let x = pattern(n, 3.0);
                let y0 = pattern(n, 4.0);
                for u_offset in [0, 1, 3, 8] {
                    let u = placed(&mut ub, &pattern(rank * n, 2.0), u_offset);
                    let a = Adapter {
                        down: &down,
                        up: &ub[u],
                        rank,
                        scale: 0.75,
                    };
                    for y_offset in 0..=lanes {
                        let yw = placed(&mut want, &y0, y_offset);
                        kernel(a, &x, &mut want[yw.clone()], false);
                        let yg = placed(&mut got, &y0, y_offset);
                        kernel(a, &x, &mut got[yg.clone()], true);
                        for (i, (w, g)) in want[yw.clone()].iter().zip(&got[yg.clone()]).enumerate()
                        {
                            assert_eq!(
                                w.to_bits(),
                                g.to_bits(),
                                "{name} rank {rank} n {n} U +{u_offset} y +{y_offset} i {i}: \
                                 {g} realigned vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn realigned_pass_gives_the_plain_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                check_realigned(
                    // SAFETY: AVX-512F detected; check_realigned passes consistent lengths.
                    |a, x, y, r| unsafe { x86::forward_avx512f_realigning(a, x, y, r) },
                    16,
                    "avx512f",
                );
                println!("tested avx512f");
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                check_realigned(
                    // SAFETY: AVX2 and FMA detected; lengths as above.
                    |a, x, y, r| unsafe { x86::forward_avx2_realigning(a, x, y, r) },
                    8,
                    "avx2+fma (memory shift)",
                );
            }
        }
        check_realigned(
            // SAFETY: `Portable` needs no CPU feature; lengths as above.
            |a, x, y, r| unsafe {
                lanes::forward_realigning::<vector::Portable<f32, 16>>(a, x, y, r)
            },
            16,
            "width 16 (baseline)",
        );
        check_realigned(
            // SAFETY: as above.
            |a, x, y, r| unsafe {
                lanes::forward_realigning::<vector::Portable<f32, 4>>(a, x, y, r)
            },
            4,
            "width 4 (baseline)",
        );
    }

    /// The realigned pass runs exactly when y is off a vector boundary and no row of U would
    /// start before U, and then stores what the plain pass does.
    #[test]
    fn realigned_pass_runs_where_it_applies() {
        use vector::Vector;
        type V = vector::Portable<f32, 16>;
        let n = 2063;
        let (mut ub, mut yb, mut wb) = (Vec::new(), Vec::new(), Vec::new());
        for u_offset in [0, 1, 15] {
            let u = placed(&mut ub, &pattern(2 * n, 2.0), u_offset);
            let up = &ub[u];
            for y_offset in 0..=16 {
                let y = placed(&mut yb, &pattern(n, 4.0), y_offset);
                // SAFETY: `Portable` needs no CPU feature.
                let cv = unsafe { [V::splat(0.5), V::splat(-1.25)] };
                // SAFETY: y and U hold n and 2·n elements.
                let next = unsafe {
                    lanes::realigned::<V, 2>(yb[y.clone()].as_mut_ptr(), up.as_ptr(), n, &cv)
                };
                // y + head is on a boundary; row 0 from `head` lies `shift` elements past one,
                // which must not be before U's start (row 1, n elements on, always fits).
                let head = (16 - y_offset % 16) % 16;
                let shift = (u_offset + head) % 16;
                assert_eq!(
                    next.is_some(),
                    head != 0 && shift <= head,
                    "U +{u_offset} y +{y_offset}"
                );
                let Some(next) = next else {
                    // Declined: nothing written.
                    assert_eq!(
                        yb[y.clone()],
                        pattern(n, 4.0)[..],
                        "U +{u_offset} y +{y_offset}"
                    );
                    continue;
                };
                // The loop stops where the next boundary of U would pass its row's end.
                assert_eq!(next, head + (n - head - 16) / 16 * 16);
                let w = placed(&mut wb, &pattern(n, 4.0), y_offset);
                for i in 0..next {
                    let want = 0.5_f32.mul_add(up[i], wb[w.start + i]);
                    let want = (-1.25_f32).mul_add(up[n + i], want);
                    assert_eq!(yb[y.start + i].to_bits(), want.to_bits(), "i {i}");
                }
                assert_eq!(yb[y.start + next..y.end], wb[w.start + next..w.end]);
            }
        }
    }

    /// The AVX-512 and NEON builds instantiate the same body at widths 16 and 4; run those
    /// widths here (compiled for AVX2+FMA, or for the baseline) so their block and tail logic
    /// is tested on any x86-64 host, even one without AVX-512.
    #[test]
    fn generic_body_at_every_width() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            check_width(
                // SAFETY: run only after detecting AVX2 and FMA; lengths as `run` checks them
                // (check_width builds consistent slices).
                |a, x, y| unsafe { x86::forward_width16_on_avx2(a, x, y) },
                "width 16 on avx2",
            );
            println!("tested width 16 under avx2+fma");
        }
        check_width(
            // SAFETY: `Portable` needs no CPU feature; check_width passes consistent lengths.
            |a, x, y| unsafe { lanes::forward::<vector::Portable<f32, 4>>(a, x, y) },
            "width 4 (baseline)",
        );
        check_width(
            // SAFETY: as above.
            |a, x, y| unsafe { lanes::forward::<vector::Portable<f32, 16>>(a, x, y) },
            "width 16 (baseline)",
        );
    }
}
