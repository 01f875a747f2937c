//! The vector abstraction every kernel body is written against: [`Vector`] (load, store,
//! splat, fused multiply-add over `LANES` elements of `f32` or `f64`) and [`Portable`], a
//! `[T; L]` implementation for tails, references and tests. x86.rs and aarch64.rs implement
//! `Vector` with `core::arch` intrinsics.

/// `f32` or `f64`: the element types the kernels compute in.
pub trait Element: Copy + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// 0.
    const ZERO: Self;
    /// The bit pattern of +∞ (see [`max_abs_bits`](Element::max_abs_bits)).
    const INFINITY_BITS: u64;
    /// The largest |v| over `values` as the bit pattern of a non-negative float, 0 when
    /// empty. Such patterns order like the values they encode, with NaN above ∞, so one
    /// integer max pass (which vectorises, unlike a float max) tells both the largest
    /// magnitude and whether every value is finite (result < `INFINITY_BITS`).
    fn max_abs_bits(values: &[Self]) -> u64;
    /// The non-negative value whose bit pattern is `bits`, widened to f64.
    fn from_abs_bits(bits: u64) -> f64;
    /// self + a·b with one rounding (`f32::mul_add` compiles to one FMA instruction where
    /// the enclosing function enables FMA; elsewhere it is a correct but slow libm call).
    fn fused_add(self, a: Self, b: Self) -> Self;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const INFINITY_BITS: u64 = f32::INFINITY.to_bits() as u64;
    fn max_abs_bits(values: &[Self]) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, just checked.
            return u64::from(unsafe { super::x86::max_abs_bits_avx2_f32(values) });
        }
        let max = values.iter().map(|v| v.to_bits() & 0x7fff_ffff).max();
        u64::from(max.unwrap_or(0))
    }
    fn from_abs_bits(bits: u64) -> f64 {
        f64::from(f32::from_bits(bits as u32))
    }
    #[inline(always)]
    fn fused_add(self, a: Self, b: Self) -> Self {
        a.mul_add(b, self)
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const INFINITY_BITS: u64 = f64::INFINITY.to_bits();
    fn max_abs_bits(values: &[Self]) -> u64 {
        let max = values
            .iter()
            .map(|v| v.to_bits() & 0x7fff_ffff_ffff_ffff)
            .max();
        max.unwrap_or(0)
    }
    fn from_abs_bits(bits: u64) -> f64 {
        f64::from_bits(bits)
    }
    #[inline(always)]
    fn fused_add(self, a: Self, b: Self) -> Self {
        a.mul_add(b, self)
    }
}

/// A SIMD vector of `LANES` elements and the operations every kernel needs.
///
/// Every method is `unsafe`: the CPU must support the instructions of the implementing type
/// (callers are `#[target_feature]` functions that require it), and `load`/`store` need
/// `LANES` readable/writable elements at `p` (any alignment).
pub(super) trait Vector: Copy {
    /// The element type.
    type Elem: Element;
    /// Number of lanes.
    const LANES: usize;
    /// All lanes 0.
    ///
    /// # Safety
    /// The CPU supports the implementing type's instructions.
    unsafe fn zero() -> Self;
    /// All lanes `v`.
    ///
    /// # Safety
    /// As [`zero`](Vector::zero).
    unsafe fn splat(v: Self::Elem) -> Self;
    /// Unaligned load of `LANES` elements.
    ///
    /// # Safety
    /// As [`zero`](Vector::zero), and `p..p + LANES` is readable.
    unsafe fn load(p: *const Self::Elem) -> Self;
    /// Unaligned store of `LANES` elements.
    ///
    /// # Safety
    /// As [`zero`](Vector::zero), and `p..p + LANES` is writable.
    unsafe fn store(self, p: *mut Self::Elem);
    /// self + a·b, lane-wise, fused (one rounding).
    ///
    /// # Safety
    /// As [`zero`](Vector::zero).
    unsafe fn mul_add(self, a: Self, b: Self) -> Self;
    /// A hint to fetch the cache line holding `p` into L1 ahead of use. Never faults, so
    /// `p` may be any address (form it with `wrapping_add`); a no-op where unsupported.
    #[inline(always)]
    fn prefetch(p: *const Self::Elem) {
        prefetch_hint::<0>(p.cast());
    }
    /// As [`prefetch`](Vector::prefetch), into L2 (and the levels beyond) but not L1.
    #[inline(always)]
    fn prefetch_l2(p: *const Self::Elem) {
        prefetch_hint::<1>(p.cast());
    }
}

/// `prefetcht0` (`LEVEL` 0) or `prefetcht1` (`LEVEL` 1) of the line holding `p` on x86-64;
/// nothing elsewhere.
#[inline(always)]
fn prefetch_hint<const LEVEL: u8>(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0`/`prefetcht1` are SSE (x86-64 baseline) and only hints: they never
    // fault and have no effect on memory, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        if LEVEL == 0 {
            _mm_prefetch::<{ _MM_HINT_T0 }>(p.cast());
        } else {
            _mm_prefetch::<{ _MM_HINT_T1 }>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A portable `[T; L]` vector: the merge kernel's one-lane tail and scalar reference
/// (`L = 1`), NEON's f64 merge (`L = 2`, one `q` register), and the tests, which run the
/// kernel bodies at any width on any CPU. Not for a kernel's main loop on x86-64: there
/// LLVM's auto-vectoriser may turn it into gathers and scatters (as it did for 16 lanes
/// under AVX-512F), so x86.rs uses `core::arch` intrinsics.
#[derive(Clone, Copy)]
pub(super) struct Portable<T, const L: usize>(pub(super) [T; L]);

impl<T: Element, const L: usize> Vector for Portable<T, L> {
    type Elem = T;
    const LANES: usize = L;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self([T::ZERO; L])
    }
    #[inline(always)]
    unsafe fn splat(v: T) -> Self {
        Self([v; L])
    }
    #[inline(always)]
    unsafe fn load(p: *const T) -> Self {
        // SAFETY: readable by this method's contract; `read_unaligned` needs no alignment.
        Self(unsafe { p.cast::<[T; L]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut T) {
        // SAFETY: writable by this method's contract; `write_unaligned` needs no alignment.
        unsafe { p.cast::<[T; L]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(mut self, a: Self, b: Self) -> Self {
        for ((s, a), b) in self.0.iter_mut().zip(a.0).zip(b.0) {
            *s = s.fused_add(a, b);
        }
        self
    }
}

/// How a kernel operand is stored, relative to the type `T` the kernel computes in: `T`
/// itself (f32, f64), or a half type (`bf16`, `f16`) that a kernel widens to `T = f32` in
/// registers as it loads it, and rounds back to once per element when it stores it.
pub trait Stored<T: Element>: Copy + Send + Sync + 'static {
    /// Widens to `T` (exact).
    fn widen(self) -> T;
    /// Rounds a `T` to this type (to nearest even; ±∞ when out of range).
    fn narrow(v: T) -> Self;
    /// self + α·acc stored back in this type: for `T` itself one FMA (one rounding), for a
    /// half type H(f32(self) + fl(α·acc)) — the product rounded to f32 first, then the sum
    /// rounded once into H, as PyTorch adds an f32 ΔW = s·(B A) to a half W.
    fn add_scaled(self, alpha: T, acc: T) -> Self;
}

impl Stored<f32> for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn add_scaled(self, alpha: f32, acc: f32) -> Self {
        self.fused_add(alpha, acc)
    }
}

impl Stored<f64> for f64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn add_scaled(self, alpha: f64, acc: f64) -> Self {
        self.fused_add(alpha, acc)
    }
}

impl Stored<f32> for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // Exact: a bf16 is the upper half of an f32's bits.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    #[inline(always)]
    fn add_scaled(self, alpha: f32, acc: f32) -> Self {
        half::bf16::from_f32(self.widen() + alpha * acc)
    }
}

impl Stored<f32> for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[inline(always)]
    fn add_scaled(self, alpha: f32, acc: f32) -> Self {
        half::f16::from_f32(self.widen() + alpha * acc)
    }
}

/// A [`Vector`] that can load `LANES` elements stored as `S` and widen them in registers
/// (`S` = the vector's own element type: a plain load), and add a scaled vector to such
/// elements in place ([`Stored::add_scaled`], lane by lane).
pub(super) trait WideLoad<S: Stored<Self::Elem>>: Vector {
    /// Unaligned load of `LANES` elements of type `S`, widened.
    ///
    /// # Safety
    /// The CPU supports the implementing type's instructions for `S` (for some pairs more
    /// than the type's own: see the impl), and `p..p + LANES` is readable.
    unsafe fn load_wide(p: *const S) -> Self;
    /// Unaligned store of the lanes rounded to `S` ([`Stored::narrow`]).
    ///
    /// # Safety
    /// As [`load_wide`](WideLoad::load_wide), and `p..p + LANES` is writable.
    unsafe fn store_narrow(self, p: *mut S);
    /// `dst[l] ← src[l].add_scaled(alpha[l], acc[l])` for every lane l, with the same
    /// roundings (`src == dst` updates in place).
    ///
    /// # Safety
    /// As [`load_wide`](WideLoad::load_wide) for `src`, and `dst..dst + LANES` is writable
    /// (the same elements as `src`, or elements overlapping none of them).
    unsafe fn add_scaled(src: *const S, dst: *mut S, alpha: Self, acc: Self);
    /// Whether [`add_scaled_pair`](WideLoad::add_scaled_pair) takes its accumulators
    /// *deinterleaved*: `acc[0]` for the even elements of its `2·LANES` (0, 2, …) and
    /// `acc[1]` for the odd ones, rather than the first and the second `LANES`. The fused
    /// update packs A's columns in that order to match (`rank_update::pack_a`).
    const PAIRS_DEINTERLEAVED: bool = false;
    /// Copies the `2·LANES` elements at `src` to `dst` deinterleaved: the even ones, then
    /// the odd ones (how the fused update packs A for a type with
    /// [`PAIRS_DEINTERLEAVED`](WideLoad::PAIRS_DEINTERLEAVED)). A type that sets it
    /// overrides this with its shuffles; this default is the plain loop.
    ///
    /// # Safety
    /// As [`load_wide`](WideLoad::load_wide); `src..src + 2·LANES` readable, `dst..dst +
    /// 2·LANES` writable, not overlapping.
    #[inline(always)]
    unsafe fn deinterleave_pair(src: *const Self::Elem, dst: *mut Self::Elem) {
        for e in 0..Self::LANES {
            // SAFETY: 2e + 1 < 2·LANES and LANES + e < 2·LANES, inside both ranges.
            unsafe {
                *dst.add(e) = *src.add(2 * e);
                *dst.add(Self::LANES + e) = *src.add(2 * e + 1);
            }
        }
    }
    /// [`add_scaled`](WideLoad::add_scaled) of two adjacent vectors: `acc[0]` for the
    /// `LANES` elements at `src`/`dst`, `acc[1]` for the `LANES` after them (or the even and
    /// the odd ones, see [`PAIRS_DEINTERLEAVED`](WideLoad::PAIRS_DEINTERLEAVED)), with the
    /// same bits. A type whose rounding to `S` ends in a pack can round both and store once.
    ///
    /// # Safety
    /// As [`add_scaled`](WideLoad::add_scaled), for `2·LANES` elements.
    #[inline(always)]
    unsafe fn add_scaled_pair(src: *const S, dst: *mut S, alpha: Self, acc: [Self; 2]) {
        // SAFETY: forwarded: each half is `LANES` of the `2·LANES` elements the contract
        // makes readable at `src` and writable at `dst`.
        unsafe {
            Self::add_scaled(src, dst, alpha, acc[0]);
            Self::add_scaled(src.add(Self::LANES), dst.add(Self::LANES), alpha, acc[1]);
        }
    }
}

impl<T: Element, S: Stored<T>, const L: usize> WideLoad<S> for Portable<T, L> {
    #[inline(always)]
    unsafe fn load_wide(p: *const S) -> Self {
        // SAFETY: readable by this method's contract; `read_unaligned` needs no alignment.
        let s = unsafe { p.cast::<[S; L]>().read_unaligned() };
        Self(s.map(S::widen))
    }
    #[inline(always)]
    unsafe fn store_narrow(self, p: *mut S) {
        // SAFETY: writable by this method's contract; `write_unaligned` needs no alignment.
        unsafe { p.cast::<[S; L]>().write_unaligned(self.0.map(S::narrow)) }
    }
    #[inline(always)]
    unsafe fn add_scaled(src: *const S, dst: *mut S, alpha: Self, acc: Self) {
        // SAFETY: readable and writable by this method's contract; unaligned access.
        unsafe {
            let mut s = src.cast::<[S; L]>().read_unaligned();
            for ((s, a), c) in s.iter_mut().zip(alpha.0).zip(acc.0) {
                *s = s.add_scaled(a, c);
            }
            dst.cast::<[S; L]>().write_unaligned(s);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    /// The element types of the kernel tests' operands, made from f32 (rounded for the half
    /// types) and widened exactly to f64 for the references.
    pub(in crate::simd) trait FromF32: Copy + Into<f64> {
        fn from_f32(v: f32) -> Self;
    }
    impl FromF32 for f32 {
        fn from_f32(v: f32) -> Self {
            v
        }
    }
    impl FromF32 for f64 {
        fn from_f32(v: f32) -> Self {
            v.into()
        }
    }
    impl FromF32 for half::bf16 {
        fn from_f32(v: f32) -> Self {
            half::bf16::from_f32(v)
        }
    }
    impl FromF32 for half::f16 {
        fn from_f32(v: f32) -> Self {
            half::f16::from_f32(v)
        }
    }
}
