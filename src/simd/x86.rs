//! x86-64 kernels, each written with its ISA's `core::arch` intrinsics: AVX2+FMA (`__m256`,
//! `__m256d`) and AVX-512F (`__m512`, `__m512d`). Each ISA instantiates the MicroLora
//! forward ([`lanes::forward`]), the merge update ([`rank_update::update`]) and the skinny
//! product ([`decode::product`]).
//!
//! `tests/codegen.rs` audits the machine code of every kernel here (FMAs on the ISA's
//! registers, no gathers or scatters), on any x86-64 host: a new kernel gets a line in its
//! table.

use std::arch::x86_64::{
    __m128i, __m256, __m256bh, __m256d, __m256i, __m512, __m512d, _mm256_add_epi32, _mm256_add_ps,
    _mm256_and_si256, _mm256_blend_epi16, _mm256_blendv_epi8, _mm256_castpd_ps,
    _mm256_castps256_ps128, _mm256_castps_pd, _mm256_castps_si256, _mm256_castsi256_ps,
    _mm256_castsi256_si128, _mm256_cmp_ps, _mm256_cmpgt_epi32, _mm256_cvtepu16_epi32,
    _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_extractf128_ps, _mm256_extracti128_si256,
    _mm256_fmadd_pd, _mm256_fmadd_ps, _mm256_loadu_pd, _mm256_loadu_ps, _mm256_loadu_si256,
    _mm256_max_epu16, _mm256_max_epu32, _mm256_movemask_ps, _mm256_mul_ps, _mm256_or_si256,
    _mm256_permute2f128_ps, _mm256_permute4x64_pd, _mm256_set1_epi16, _mm256_set1_epi32,
    _mm256_set1_pd, _mm256_set1_ps, _mm256_setzero_pd, _mm256_setzero_ps, _mm256_setzero_si256,
    _mm256_shuffle_ps, _mm256_slli_epi32, _mm256_srli_epi32, _mm256_storeu_pd, _mm256_storeu_ps,
    _mm256_storeu_si256, _mm256_unpackhi_ps, _mm256_unpacklo_ps, _mm512_add_epi32, _mm512_add_ps,
    _mm512_and_si512, _mm512_castps512_ps256, _mm512_castps_pd, _mm512_castps_si512,
    _mm512_castsi512_ps, _mm512_cmp_ps_mask, _mm512_cvtepi32_epi16, _mm512_cvtepu16_epi32,
    _mm512_cvtneps_pbh, _mm512_cvtph_ps, _mm512_cvtps_ph, _mm512_extractf64x4_pd, _mm512_fmadd_pd,
    _mm512_fmadd_ps, _mm512_fpclass_ps_mask, _mm512_loadu_pd, _mm512_loadu_ps,
    _mm512_mask_or_epi32, _mm512_mul_ps, _mm512_permutex2var_ps, _mm512_set1_epi32, _mm512_set1_pd,
    _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_pd, _mm512_setzero_ps, _mm512_slli_epi32,
    _mm512_srli_epi32, _mm512_storeu_pd, _mm512_storeu_ps, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
    _mm_loadu_si128, _mm_movehl_ps, _mm_packus_epi32, _mm_shuffle_ps, _mm_storeu_si128,
    _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
};

use ndarray::ArrayViewMut2;

use super::convert;
use super::decode;
use super::lanes::{self, Lanes};
use super::rank_update::{self, Operands};
#[cfg(test)]
use super::vector::Portable;
use super::vector::{Vector, WideLoad};

use super::Adapter;
use half::{bf16, f16};

/// Declares a one-register vector type and implements [`Vector`] for it with that
/// register's intrinsics (`$isa` names the CPU features its methods need).
macro_rules! register_vector {
    (
        $(#[$doc:meta])*
        $name:ident($reg:ty): $elem:ty, $lanes:literal lanes, needs $isa:literal;
        $zero:ident, $splat:ident, $load:ident, $store:ident, $fmadd:ident
    ) => {
        $(#[$doc])*
        #[doc = concat!("\n\nMethods need ", $isa, " (the [`Vector`] contract).")]
        #[derive(Clone, Copy)]
        struct $name($reg);

        impl Vector for $name {
            type Elem = $elem;
            const LANES: usize = $lanes;
            #[inline(always)]
            unsafe fn zero() -> Self {
                // SAFETY: the CPU has the type's ISA (`needs` above), per the trait contract.
                Self(unsafe { $zero() })
            }
            #[inline(always)]
            unsafe fn splat(v: $elem) -> Self {
                // SAFETY: the CPU has the type's ISA (`needs` above), per the trait contract.
                Self(unsafe { $splat(v) })
            }
            #[inline(always)]
            unsafe fn load(p: *const $elem) -> Self {
                // SAFETY: the type's ISA is present; `LANES` readable elements at `p` (the
                // method's contract); `loadu` needs no alignment.
                Self(unsafe { $load(p) })
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut $elem) {
                // SAFETY: the type's ISA is present; `LANES` writable elements at `p` (the
                // method's contract); `storeu` needs no alignment.
                unsafe { $store(p, self.0) }
            }
            #[inline(always)]
            unsafe fn mul_add(self, a: Self, b: Self) -> Self {
                // SAFETY: the type's ISA is present (both include FMA: AVX-512F implies it).
                Self(unsafe { $fmadd(a.0, b.0, self.0) })
            }
        }

        impl WideLoad<$elem> for $name {
            #[inline(always)]
            unsafe fn load_wide(p: *const $elem) -> Self {
                // SAFETY: forwarded (the same contract as `load`).
                unsafe { Self::load(p) }
            }
            #[inline(always)]
            unsafe fn store_narrow(self, p: *mut $elem) {
                // SAFETY: forwarded (the same contract as `store`).
                unsafe { self.store(p) }
            }
            #[inline(always)]
            unsafe fn add_scaled(src: *const $elem, dst: *mut $elem, alpha: Self, acc: Self) {
                // SAFETY: forwarded: `LANES` readable elements at `src`, writable at `dst`.
                unsafe { Self::load(src).mul_add(alpha, acc).store(dst) }
            }
        }
    };
}

register_vector! {
    /// Eight f32 lanes in one `ymm` register.
    Avx2(__m256): f32, 8 lanes, needs "AVX2 and FMA";
    _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps
}

register_vector! {
    /// Four f64 lanes in one `ymm` register.
    Avx2F64(__m256d): f64, 4 lanes, needs "AVX2 and FMA";
    _mm256_setzero_pd, _mm256_set1_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_fmadd_pd
}

register_vector! {
    /// Sixteen f32 lanes in one `zmm` register.
    Avx512(__m512): f32, 16 lanes, needs "AVX-512F";
    _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps
}

register_vector! {
    /// Eight f64 lanes in one `zmm` register.
    Avx512F64(__m512d): f64, 8 lanes, needs "AVX-512F";
    _mm512_setzero_pd, _mm512_set1_pd, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_fmadd_pd
}

register_vector! {
    /// Sixteen f32 lanes in one `zmm` register on a CPU that also converts to bf16 in
    /// hardware (AVX512_BF16, with AVX512DQ for `vfpclassps`): [`Avx512`] but for how it
    /// stores bf16 (`store_bf16_zmm_ne`).
    Avx512Bf16(__m512): f32, 16 lanes, needs "AVX-512F, AVX512DQ and AVX512_BF16";
    _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps
}

/// Implements [`WideLoad`] of a half type for an f32 register vector: `$load` widens a
/// pointer's `LANES` halves into the register, `$narrow` rounds a register to halves and
/// stores them; the update is H(f32(w) + fl(α·acc)) with `$mul` and `$add` (no FMA: the
/// product is rounded to f32 first, as PyTorch forms ΔW before adding it).
macro_rules! half_vector {
    (
        $name:ident, $half:ty, needs $isa:literal; $load:ident, $narrow:ident, $mul:ident, $add:ident
        $(; deinterleaved pairs $pair:ident)?
    ) => {
        #[doc = concat!("Methods need ", $isa, ".")]
        impl WideLoad<$half> for $name {
            #[inline(always)]
            unsafe fn load_wide(p: *const $half) -> Self {
                // SAFETY: the CPU has the ISA this pair needs (`needs` above, the trait
                // contract); `LANES` readable halves at `p`.
                Self(unsafe { $load(p) })
            }
            #[inline(always)]
            unsafe fn store_narrow(self, p: *mut $half) {
                // SAFETY: as `load_wide`; `LANES` writable halves at `p` (the contract).
                unsafe { $narrow(self.0, p) }
            }
            #[inline(always)]
            unsafe fn add_scaled(src: *const $half, dst: *mut $half, alpha: Self, acc: Self) {
                // SAFETY: as `load_wide`; `LANES` readable halves at `src`, writable at
                // `dst` (the contract).
                unsafe {
                    let t = $mul(alpha.0, acc.0);
                    $narrow($add($load(src), t), dst);
                }
            }
            $(
            const PAIRS_DEINTERLEAVED: bool = true;
            #[inline(always)]
            unsafe fn deinterleave_pair(src: *const f32, dst: *mut f32) {
                // SAFETY: as `load_wide`; `2·LANES` readable at `src`, writable at `dst`.
                unsafe { deinterleave_ymm_pair(src, dst) }
            }
            #[inline(always)]
            unsafe fn add_scaled_pair(src: *const $half, dst: *mut $half, alpha: Self, acc: [Self; 2]) {
                // SAFETY: as `load_wide`; `2·LANES` readable halves at `src`, writable at
                // `dst` (the contract).
                unsafe { $pair(src, dst, alpha.0, acc[0].0, acc[1].0) }
            }
            )?
        }
    };
}

half_vector!(Avx512, bf16, needs "AVX-512F"; load_bf16_zmm, store_bf16_zmm, _mm512_mul_ps, _mm512_add_ps);
half_vector!(Avx512, f16, needs "AVX-512F"; load_f16_zmm, store_f16_zmm, _mm512_mul_ps, _mm512_add_ps);
half_vector!(Avx512Bf16, bf16, needs "AVX-512F, AVX512DQ and AVX512_BF16"; load_bf16_zmm, store_bf16_zmm_ne, _mm512_mul_ps, _mm512_add_ps);
half_vector!(Avx2, bf16, needs "AVX2 and FMA"; load_bf16_ymm, store_bf16_ymm, _mm256_mul_ps, _mm256_add_ps; deinterleaved pairs add_scaled_bf16_ymm_pair);
half_vector!(Avx2, f16, needs "AVX2, FMA and F16C"; load_f16_ymm, store_f16_ymm, _mm256_mul_ps, _mm256_add_ps);

/// Sixteen bf16 at `p` widened: zero-extended to 32 bits (`vpmovzxwd`), shifted up 16.
///
/// # Safety
/// AVX-512F; 16 readable halves at `p` (any alignment).
#[inline(always)]
unsafe fn load_bf16_zmm(p: *const bf16) -> __m512 {
    // SAFETY: by this function's contract; `loadu` needs no alignment.
    unsafe {
        let h = _mm256_loadu_si256(p.cast::<__m256i>());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// Sixteen f16 at `p` widened (`vcvtph2ps`, exact).
///
/// # Safety
/// AVX-512F; 16 readable halves at `p` (any alignment).
#[inline(always)]
unsafe fn load_f16_zmm(p: *const f16) -> __m512 {
    // SAFETY: by this function's contract; `loadu` needs no alignment.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>())) }
}

/// Eight bf16 at `p` widened: zero-extended to 32 bits (`vpmovzxwd`), shifted up 16.
///
/// # Safety
/// AVX2; 8 readable halves at `p` (any alignment).
#[inline(always)]
unsafe fn load_bf16_ymm(p: *const bf16) -> __m256 {
    // SAFETY: by this function's contract; `loadu` needs no alignment.
    unsafe {
        let h = _mm_loadu_si128(p.cast::<__m128i>());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Eight f16 at `p` widened (`vcvtph2ps`, exact).
///
/// # Safety
/// F16C (with AVX); 8 readable halves at `p` (any alignment).
#[inline(always)]
unsafe fn load_f16_ymm(p: *const f16) -> __m256 {
    // SAFETY: by this function's contract; `loadu` needs no alignment.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
}

/// The f32 → bf16 rounding of `half::bf16::from_f32` on 32-bit lanes holding f32 bits:
/// to nearest even (add 0x7fff plus the kept part's lowest bit, keep the upper 16 bits;
/// overflow carries into ∞), and a NaN keeps its upper bits with the quiet bit set.
macro_rules! bf16_bits {
    ($bits:expr, $set1:ident, $and:ident, $or:ident, $add:ident, $srli:ident) => {{
        let bits = $bits;
        let high = $srli::<16>(bits);
        let lsb = $and(high, $set1(1));
        let rounded = $srli::<16>($add(bits, $add(lsb, $set1(0x7fff))));
        let quiet = $or(high, $set1(0x40));
        let nan_test = ($and(bits, $set1(0x7fff_ffff)), $set1(0x7f80_0000));
        (rounded, quiet, nan_test)
    }};
}

/// Rounds 16 f32 lanes to bf16 (as `half::bf16::from_f32`) and stores them at `p`: to
/// nearest even (add 0x7fff plus the kept part's lowest bit, keep the upper 16 bits;
/// overflow carries into ∞), a NaN keeps its upper bits with the quiet bit set.
///
/// # Safety
/// AVX-512F; 16 writable halves at `p` (any alignment).
#[inline(always)]
unsafe fn store_bf16_zmm(v: __m512, p: *mut bf16) {
    // SAFETY: by this function's contract; `storeu` needs no alignment.
    unsafe {
        let bits = _mm512_castps_si512(v);
        let high = _mm512_srli_epi32::<16>(bits);
        let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let h = _mm512_mask_or_epi32(rounded, nan, high, _mm512_set1_epi32(0x40));
        _mm256_storeu_si256(p.cast::<__m256i>(), _mm512_cvtepi32_epi16(h));
    }
}

/// [`store_bf16_zmm`] by the hardware conversion (`vcvtneps2bf16`: to nearest even, NaN
/// quieted keeping its upper bits, the same bits) where it agrees with it: on every lane
/// but subnormal ones, which the instruction flushes to zero. A vector holding one is
/// rounded in integer lanes instead (rare: a merged weight below 2⁻¹²⁶ in magnitude).
/// The rounding and store take about 5 uops per 16 weights here against 10; measured on an
/// Intel Xeon (AVX-512, bf16 merge of a 256×2048 band, r = 16): 200 → 175 µs.
///
/// # Safety
/// AVX-512F, AVX512DQ and AVX512_BF16; 16 writable halves at `p` (any alignment).
#[inline(always)]
unsafe fn store_bf16_zmm_ne(v: __m512, p: *mut bf16) {
    // SAFETY: by this function's contract; `storeu` needs no alignment.
    unsafe {
        // fpclass 0x20: the subnormal lanes.
        if _mm512_fpclass_ps_mask::<0x20>(v) == 0 {
            let h: __m256bh = _mm512_cvtneps_pbh(v);
            // SAFETY (transmute): both are 256 bits of plain data, 16 bf16 lanes each.
            let h: __m256i = std::mem::transmute::<__m256bh, __m256i>(h);
            _mm256_storeu_si256(p.cast::<__m256i>(), h);
        } else {
            store_bf16_zmm(v, p);
        }
    }
}

/// Rounds 16 f32 lanes to f16 to nearest even (`vcvtps2ph`) and stores them at `p`.
///
/// # Safety
/// AVX-512F; 16 writable halves at `p` (any alignment).
#[inline(always)]
unsafe fn store_f16_zmm(v: __m512, p: *mut f16) {
    // SAFETY: by this function's contract; `storeu` needs no alignment.
    unsafe {
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm256_storeu_si256(p.cast::<__m256i>(), h);
    }
}

/// [`bf16_bits!`] on 8 AVX2 lanes: (rounded, quiet NaN, (|bits|, the ∞ pattern)). Parts a
/// caller leaves unused are dropped by the compiler (it is inlined).
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn bf16_bits_ymm(v: __m256) -> (__m256i, __m256i, (__m256i, __m256i)) {
    // SAFETY: AVX2 by this function's contract; lane arithmetic only, no memory access.
    unsafe {
        bf16_bits!(
            _mm256_castps_si256(v),
            _mm256_set1_epi32,
            _mm256_and_si256,
            _mm256_or_si256,
            _mm256_add_epi32,
            _mm256_srli_epi32
        )
    }
}

/// Rounds 8 f32 lanes to bf16 (as `half::bf16::from_f32`) and stores them at `p`.
///
/// # Safety
/// AVX2; 8 writable halves at `p` (any alignment).
#[inline(always)]
unsafe fn store_bf16_ymm(v: __m256, p: *mut bf16) {
    // SAFETY: by this function's contract; `storeu` needs no alignment.
    unsafe {
        let (rounded, quiet, (abs, inf)) = bf16_bits_ymm(v);
        let nan = _mm256_cmpgt_epi32(abs, inf);
        let h = _mm256_blendv_epi8(rounded, quiet, nan);
        // Lanes hold values < 2¹⁶, so the unsigned-saturating pack keeps them exactly.
        let h = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        _mm_storeu_si128(p.cast::<__m128i>(), h);
    }
}

/// W ← bf16(f32(W) + fl(α·acc)) for the 16 bf16 at `src`, written at `dst`, with the
/// accumulators deinterleaved ([`WideLoad::PAIRS_DEINTERLEAVED`]): `even` for elements 0,
/// 2, …, 14, `odd` for 1, 3, …, 15. The same bits as two [`store_bf16_ymm`] of the sums in
/// memory order, in fewer instructions: one load widens all 16 (each 32-bit lane holds an
/// even element in its low half and the next odd one in its high half: a 16-bit shift up
/// gives the even ones, masking the low half away the odd ones); when no lane is NaN both
/// sums round to nearest even in 32-bit lanes, and one word blend puts each rounded odd
/// element above its even neighbour. 20 vector instructions per 16 weights besides the
/// store (load, widening, update, NaN test, rounding, blend) against 22 with the elements
/// in order, which needed two `vpmovzxwd`, a `vpackusdw` and a `vpermq`; 4 shifts instead
/// of 6. Measured on AMD EPYC Zen 3 (bf16 merge of a layer, r = 16, one thread, processes
/// alternated, best of 10 per round, three rounds, 2026-12-03, with A packed by
/// [`deinterleave_ymm_pair`]): 1024² 0.535–0.543 → 0.479–0.484 ms, 4096² 9.46–9.61 →
/// 8.44–8.53 ms, the f32 merge beside it unchanged (bf16 / f32 1.19–1.21× → 1.08–1.09× and
/// 1.19–1.25× → 1.09–1.10×).
///
/// # Safety
/// AVX2; 16 readable halves at `src` and 16 writable at `dst` (the same, or not
/// overlapping them).
#[inline(always)]
unsafe fn add_scaled_bf16_ymm_pair(
    src: *const bf16,
    dst: *mut bf16,
    alpha: __m256,
    even: __m256,
    odd: __m256,
) {
    // SAFETY: by this function's contract; `loadu`/`storeu` need no alignment; the
    // fallback stores the same 16 halves.
    unsafe {
        let w = _mm256_loadu_si256(src.cast::<__m256i>());
        let w_even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
        let w_odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(!0xffff)));
        let even = _mm256_add_ps(w_even, _mm256_mul_ps(alpha, even));
        let odd = _mm256_add_ps(w_odd, _mm256_mul_ps(alpha, odd));
        // Unordered in a lane where either sum is NaN: one compare tests both.
        if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(even, odd)) != 0 {
            store_bf16_ymm_deinterleaved_nan(even, odd, dst);
            return;
        }
        // To nearest even, as `store_bf16_ymm` (no NaN here, so nothing carries past bit
        // 31): add 0x7fff plus the kept part's lowest bit; the bf16 is the upper half.
        let round = |v: __m256| {
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)))
        };
        let even = _mm256_srli_epi32::<16>(round(even));
        // Low words (even elements) from `even`, high words (odd elements) from `odd`.
        let h = _mm256_blend_epi16::<0b1010_1010>(even, round(odd));
        _mm256_storeu_si256(dst.cast::<__m256i>(), h);
    }
}

/// The 16 f32 at `src` copied to `dst` as the 8 even ones, then the 8 odd ones: two loads,
/// two in-lane shuffles, two 64-bit permutes, two stores.
///
/// # Safety
/// AVX2; 16 readable f32 at `src`, 16 writable at `dst` (any alignment).
#[inline(always)]
unsafe fn deinterleave_ymm_pair(src: *const f32, dst: *mut f32) {
    // SAFETY: by this function's contract; `loadu`/`storeu` need no alignment.
    unsafe {
        let (a, b) = (_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8)));
        // Per 128-bit half: a's and b's even (odd) elements: 0 2 8 10 | 4 6 12 14.
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        // 64-bit units 0 2 1 3 put them in order.
        let order = |v: __m256| {
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
        };
        _mm256_storeu_ps(dst, order(even));
        _mm256_storeu_ps(dst.add(8), order(odd));
    }
}

/// The rare path of [`add_scaled_bf16_ymm_pair`] (a NaN among the 16 sums): puts the sums
/// back in memory order and stores each 8 by [`store_bf16_ymm`]. Kept out of line so that
/// the kernel's epilogue stays small enough to unroll: inlined, such a path left the AVX2
/// bf16 kernel's accumulators in memory, stored back on every step of its FMA loop.
///
/// # Safety
/// AVX2; 16 writable halves at `p` (any alignment).
#[cold]
#[inline(never)]
#[target_feature(enable = "avx2")]
unsafe fn store_bf16_ymm_deinterleaved_nan(even: __m256, odd: __m256, p: *mut bf16) {
    // SAFETY: by this function's contract, 8 writable halves at `p` and 8 at `p + 8`.
    unsafe {
        // Per 128-bit half: elements 0–3 and 8–11, then 4–7 and 12–15.
        let low = _mm256_unpacklo_ps(even, odd);
        let high = _mm256_unpackhi_ps(even, odd);
        store_bf16_ymm(_mm256_permute2f128_ps::<0x20>(low, high), p);
        store_bf16_ymm(_mm256_permute2f128_ps::<0x31>(low, high), p.add(8));
    }
}

/// Rounds 8 f32 lanes to f16 to nearest even (`vcvtps2ph`) and stores them at `p`.
///
/// # Safety
/// F16C (with AVX); 8 writable halves at `p` (any alignment).
#[inline(always)]
unsafe fn store_f16_ymm(v: __m256, p: *mut f16) {
    // SAFETY: by this function's contract; `storeu` needs no alignment.
    unsafe {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm_storeu_si128(p.cast::<__m128i>(), h);
    }
}

/// The sum of a `ymm` register's eight lanes: halves, then pairs, then the last two.
///
/// # Safety
/// The CPU supports AVX (SSE is part of the x86-64 baseline).
#[inline(always)]
unsafe fn sum_ymm(v: __m256) -> f32 {
    // SAFETY: AVX present, by this function's contract.
    unsafe {
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_shuffle_ps::<0b01>(v, v));
        _mm_cvtss_f32(v)
    }
}

impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: AVX present (implied by AVX2, the trait contract).
        Self(unsafe { _mm256_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: AVX present.
        unsafe { sum_ymm(self.0) }
    }
}

impl Lanes for Avx512 {
    const SHIFTS: bool = true;
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: AVX-512F present, per the trait contract.
        Self(unsafe { _mm512_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn shifted(lo: Self, hi: Self, shift: usize) -> Self {
        // SAFETY: AVX-512F present, per the trait contract. `vpermt2ps` picks lane l of the
        // result from lane (shift + l) of lo:hi (index bit 4 selects hi); shift < 16.
        unsafe {
            let index = _mm512_add_epi32(
                _mm512_set1_epi32(shift as i32),
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            );
            Self(_mm512_permutex2var_ps(lo.0, index, hi.0))
        }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: AVX-512F present (it implies AVX). Adds the upper 256 bits (extracted as
        // four f64 lanes, reinterpreted: no conversion) to the lower, then sums eight lanes.
        unsafe {
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            sum_ymm(_mm256_add_ps(_mm512_castps512_ps256(self.0), high))
        }
    }
}

/// AVX2+FMA kernel.
///
/// # Safety
/// The CPU supports AVX2 and FMA, and the lengths satisfy the `KernelFn` contract in
/// [`super`] (rank 1 or 2, `down`/`up` of `rank·n`, `y` of `n`).
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn forward_avx2_fma(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; lengths forwarded.
    unsafe { lanes::forward::<Avx2>(a, x, y) }
}

/// AVX-512F kernel: 16 lanes in `zmm` registers.
///
/// # Safety
/// The CPU supports AVX-512F, and the lengths satisfy the `KernelFn` contract in [`super`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn forward_avx512f(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: AVX-512F enabled here and present by our contract; lengths forwarded.
    unsafe { lanes::forward::<Avx512>(a, x, y) }
}

/// Test-only: the AVX-512F kernel with pass 2's realignment on or off.
///
/// # Safety
/// As [`forward_avx512f`].
#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn forward_avx512f_realigning(
    a: Adapter<'_>,
    x: &[f32],
    y: &mut [f32],
    realign: bool,
) {
    // SAFETY: forwarded.
    unsafe { lanes::forward_realigning::<Avx512>(a, x, y, realign) }
}

/// Test-only: the AVX2+FMA kernel with pass 2's realignment on or off (on, it runs the
/// default, memory-based [`Lanes::shifted`]).
///
/// # Safety
/// As [`forward_avx2_fma`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_avx2_realigning(
    a: Adapter<'_>,
    x: &[f32],
    y: &mut [f32],
    realign: bool,
) {
    // SAFETY: forwarded.
    unsafe { lanes::forward_realigning::<Avx2>(a, x, y, realign) }
}

/// Test-only: the 16-lane body (the AVX-512 kernel's block and tail logic) as portable
/// vectors compiled for AVX2+FMA, so that hosts without AVX-512 still run it.
///
/// # Safety
/// As [`forward_avx2_fma`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_width16_on_avx2(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: lengths forwarded; `Portable` needs no particular CPU feature.
    unsafe { lanes::forward::<Portable<f32, 16>>(a, x, y) }
}

/// Merge update, f32, AVX2+FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn update_avx2_f32(o: &Operands<f32>) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx2, f32>(o) }
}

/// Merge update, f64, AVX2+FMA.
///
/// # Safety
/// As [`update_avx2_f32`].
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn update_avx2_f64(o: &Operands<f64>) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx2F64, f64>(o) }
}

/// Merge update, f32, AVX-512F (16 lanes in `zmm` registers).
///
/// # Safety
/// The CPU supports AVX-512F; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn update_avx512_f32(o: &Operands<f32>) {
    // SAFETY: AVX-512F enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx512, f32>(o) }
}

/// Merge update, f64, AVX-512F (8 lanes in `zmm` registers).
///
/// # Safety
/// As [`update_avx512_f32`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn update_avx512_f64(o: &Operands<f64>) {
    // SAFETY: AVX-512F enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx512F64, f64>(o) }
}

/// Merge update of a bf16 W (f32 factors), AVX2+FMA: each vector of W widened as it is
/// loaded, W ← bf16(f32(W) + fl(α·acc)) rounded to nearest even in integer lanes.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn update_avx2_bf16(o: &Operands<f32, bf16>) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx2, bf16>(o) }
}

/// Merge update of an f16 W (f32 factors), AVX2+FMA+F16C: `vcvtph2ps` in, W ←
/// f16(f32(W) + fl(α·acc)) by `vcvtps2ph` (to nearest even) out.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `o` satisfies the [`rank_update::UpdateFn`]
/// contract.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn update_avx2_f16(o: &Operands<f32, f16>) {
    // SAFETY: AVX2, FMA and F16C enabled here and present by our contract; operands
    // forwarded.
    unsafe { rank_update::update::<Avx2, f16>(o) }
}

/// Merge update of a bf16 W (f32 factors), AVX-512F (as [`update_avx2_bf16`], 16 lanes).
///
/// # Safety
/// The CPU supports AVX-512F; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn update_avx512_bf16(o: &Operands<f32, bf16>) {
    // SAFETY: AVX-512F enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx512, bf16>(o) }
}

/// [`update_avx512_bf16`] on a CPU with AVX512_BF16 (and AVX512DQ): W rounded to bf16 by
/// `vcvtneps2bf16` (`store_bf16_zmm_ne`), the same bits.
///
/// # Safety
/// The CPU supports AVX-512F, AVX512DQ and AVX512_BF16; `o` satisfies the
/// [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx512f,avx512dq,avx512bf16")]
#[inline(never)]
pub(super) unsafe fn update_avx512bf16_bf16(o: &Operands<f32, bf16>) {
    // SAFETY: the three features enabled here and present by our contract; operands
    // forwarded.
    unsafe { rank_update::update::<Avx512Bf16, bf16>(o) }
}

/// Whether this CPU has what [`update_avx512bf16_bf16`] needs beyond AVX-512F.
pub(super) fn has_avx512_bf16() -> bool {
    is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512dq")
}

/// Merge update of an f16 W (f32 factors), AVX-512F (as [`update_avx2_f16`], 16 lanes).
///
/// # Safety
/// The CPU supports AVX-512F; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn update_avx512_f16(o: &Operands<f32, f16>) {
    // SAFETY: AVX-512F enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx512, f16>(o) }
}

/// Test-only: the AVX-512 f32 update's width (16 lanes, portable vectors) compiled for
/// AVX2+FMA, so that hosts without AVX-512 still run its tile and tail logic.
///
/// # Safety
/// As [`update_avx2_f32`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn update_width16_on_avx2_f32(o: &Operands<f32>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f32, 16>, f32>(o) }
}

/// Test-only: the AVX-512 f64 update's width (8 lanes) compiled for AVX2+FMA.
///
/// # Safety
/// As [`update_avx2_f64`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn update_width8_on_avx2_f64(o: &Operands<f64>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f64, 8>, f64>(o) }
}

/// Skinny product (see [`decode`]), f32, AVX2+FMA: 4 rows of W × 3 rows of X per tile (12
/// accumulators, 3 vectors of X and one of W: all 16 `ymm` registers). Measured against
/// 4×2, 6×2, 3×4, 5×2 and 8×1 tiles (n = 8–64, W in L2): 10–25 % ahead. Panels of at most
/// [`decode::SMALL_PANEL`] rows (n ≤ 2, memory-bound) run 6×2 tiles instead: six streams of
/// W's rows at once were 15–20 % faster than four at n = 1 and 2 (4096² W, AMD Zen 4 at
/// this level).
///
/// # Safety
/// The CPU supports AVX2 and FMA; the arguments satisfy the [`decode::ProductFn`] contract.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn product_avx2_f32(
    o: &decode::Operands<'_, '_, f32>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx2, f32, 4, 3, 6>(o, i0, y) }
}

/// Skinny product, f64, AVX2+FMA (tiles as [`product_avx2_f32`]).
///
/// # Safety
/// As [`product_avx2_f32`].
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn product_avx2_f64(
    o: &decode::Operands<'_, '_, f64>,
    i0: usize,
    y: ArrayViewMut2<'_, f64>,
) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx2F64, f64, 4, 3, 6>(o, i0, y) }
}

/// Skinny product, f32, AVX-512F: 16 lanes in `zmm` registers, 6 rows of W × 4 rows of X
/// per tile (24 accumulators of the 32 registers). Measured against 4×4, 8×3, 4×6, 7×3, 5×4,
/// 12×2 and 8×2 tiles on a 4096² W (n = 8–32): the fastest or within noise. Panels of at
/// most [`decode::SMALL_PANEL`] rows run 8×2 tiles: eight streams of W's rows were 5 % (f32)
/// and 10 % (bf16) faster than six at n = 1 and 2, 12 rows slower (AMD Zen 4).
///
/// # Safety
/// The CPU supports AVX-512F; the arguments satisfy the [`decode::ProductFn`] contract.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn product_avx512_f32(
    o: &decode::Operands<'_, '_, f32>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: AVX-512F enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx512, f32, 6, 4, 8>(o, i0, y) }
}

/// Skinny product, f64, AVX-512F (8 lanes in `zmm` registers; tiles as
/// [`product_avx512_f32`]).
///
/// # Safety
/// As [`product_avx512_f32`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn product_avx512_f64(
    o: &decode::Operands<'_, '_, f64>,
    i0: usize,
    y: ArrayViewMut2<'_, f64>,
) {
    // SAFETY: AVX-512F enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx512F64, f64, 6, 4, 8>(o, i0, y) }
}

/// Test-only: the AVX-512 f32 skinny product's width and tiles (16 lanes as portable
/// vectors) compiled for AVX2+FMA, so that hosts without AVX-512 still run its tile and
/// tail logic.
///
/// # Safety
/// As [`product_avx2_f32`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn product_width16_on_avx2_f32(
    o: &decode::Operands<'_, '_, f32>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: `Portable` needs no particular CPU feature; arguments forwarded.
    unsafe { decode::product_small_split::<Portable<f32, 16>, f32, 6, 4, 8>(o, i0, y) }
}

/// Test-only: the AVX-512 f64 skinny product's width and tiles (8 lanes) compiled for
/// AVX2+FMA.
///
/// # Safety
/// As [`product_avx2_f64`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn product_width8_on_avx2_f64(
    o: &decode::Operands<'_, '_, f64>,
    i0: usize,
    y: ArrayViewMut2<'_, f64>,
) {
    // SAFETY: `Portable` needs no particular CPU feature; arguments forwarded.
    unsafe { decode::product_small_split::<Portable<f64, 8>, f64, 6, 4, 8>(o, i0, y) }
}

/// Skinny product with W stored as bf16 (X, Y and the sums in f32), AVX2+FMA: each vector
/// of W widened as it is loaded (`vpmovzxwd`, then a 16-bit shift); tiles as
/// [`product_avx2_f32`].
///
/// # Safety
/// The CPU supports AVX2 and FMA; the arguments satisfy the [`decode::ProductFn`] contract.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn product_avx2_bf16(
    o: &decode::Operands<'_, '_, f32, bf16>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx2, bf16, 4, 3, 6>(o, i0, y) }
}

/// Skinny product with W stored as f16, AVX2+FMA+F16C: each vector of W widened as it is
/// loaded (`vcvtph2ps`); tiles as [`product_avx2_f32`].
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; the arguments satisfy the [`decode::ProductFn`]
/// contract.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn product_avx2_f16(
    o: &decode::Operands<'_, '_, f32, f16>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: AVX2, FMA and F16C enabled here and present by our contract; arguments
    // forwarded.
    unsafe { decode::product_small_split::<Avx2, f16, 4, 3, 6>(o, i0, y) }
}

/// Skinny product with W stored as bf16, AVX-512F: 16 halves widened per load
/// (`vpmovzxwd`, then a 16-bit shift); tiles as [`product_avx512_f32`].
///
/// # Safety
/// The CPU supports AVX-512F; the arguments satisfy the [`decode::ProductFn`] contract.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn product_avx512_bf16(
    o: &decode::Operands<'_, '_, f32, bf16>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: AVX-512F enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx512, bf16, 6, 4, 8>(o, i0, y) }
}

/// Skinny product with W stored as f16, AVX-512F: 16 halves widened per load
/// (`vcvtph2ps`); tiles as [`product_avx512_f32`].
///
/// # Safety
/// The CPU supports AVX-512F; the arguments satisfy the [`decode::ProductFn`] contract.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn product_avx512_f16(
    o: &decode::Operands<'_, '_, f32, f16>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: AVX-512F enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product_small_split::<Avx512, f16, 6, 4, 8>(o, i0, y) }
}

/// Widens bf16 to f32 over a row (see [`convert`]), AVX2+FMA.
///
/// # Safety
/// The CPU supports AVX2+FMA; the arguments satisfy [`convert::WidenFn`].
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn widen_avx2_bf16(src: &[bf16], dst: &mut [f32]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::widen::<Avx2, bf16>(src, dst) }
}

/// Rounds f32 to bf16 over a row (see [`convert`]), AVX2+FMA.
///
/// # Safety
/// As [`widen_avx2_bf16`], with [`convert::RoundFn`].
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
pub(super) unsafe fn round_avx2_bf16(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::round::<Avx2, bf16>(src, dst) }
}

/// Widens f16 to f32 over a row (see [`convert`]), AVX2, FMA and F16C.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; the arguments satisfy [`convert::WidenFn`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn widen_avx2_f16(src: &[f16], dst: &mut [f32]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::widen::<Avx2, f16>(src, dst) }
}

/// Rounds f32 to f16 over a row (see [`convert`]), AVX2, FMA and F16C.
///
/// # Safety
/// As [`widen_avx2_f16`], with [`convert::RoundFn`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
pub(super) unsafe fn round_avx2_f16(src: &[f32], dst: &mut [f16]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::round::<Avx2, f16>(src, dst) }
}

/// Widens bf16 to f32 over a row (see [`convert`]), AVX-512F.
///
/// # Safety
/// The CPU supports AVX-512F; the arguments satisfy [`convert::WidenFn`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn widen_avx512_bf16(src: &[bf16], dst: &mut [f32]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::widen::<Avx512, bf16>(src, dst) }
}

/// Rounds f32 to bf16 over a row (see [`convert`]), AVX-512F.
///
/// # Safety
/// As [`widen_avx512_bf16`], with [`convert::RoundFn`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn round_avx512_bf16(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::round::<Avx512, bf16>(src, dst) }
}

/// Widens f16 to f32 over a row (see [`convert`]), AVX-512F.
///
/// # Safety
/// The CPU supports AVX-512F; the arguments satisfy [`convert::WidenFn`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn widen_avx512_f16(src: &[f16], dst: &mut [f32]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::widen::<Avx512, f16>(src, dst) }
}

/// Rounds f32 to f16 over a row (see [`convert`]), AVX-512F.
///
/// # Safety
/// As [`widen_avx512_f16`], with [`convert::RoundFn`].
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(super) unsafe fn round_avx512_f16(src: &[f32], dst: &mut [f16]) {
    // SAFETY: the features are enabled here and present by our contract; forwarded.
    unsafe { convert::round::<Avx512, f16>(src, dst) }
}

/// Declares an AVX2 function giving the largest `bits & mask` over a slice of `$elem`
/// (`$bits` wide): four `ymm` accumulators under the unsigned max `$max`, then the scalar
/// tail. Written with intrinsics because the x86-64 baseline has no unsigned 16- or 32-bit
/// max and the auto-vectoriser does not run at the dev profile's opt-level.
macro_rules! max_abs_bits_avx2 {
    (
        $(#[$doc:meta])*
        $name:ident($elem:ty) -> $bits:ty, $mask:literal, $splat:expr, $max:ident, $to_bits:expr
    ) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU supports AVX2.
        #[target_feature(enable = "avx2")]
        #[inline(never)]
        pub(super) unsafe fn $name(values: &[$elem]) -> $bits {
            const LANES: usize = 32 / std::mem::size_of::<$bits>();
            // SAFETY: AVX2 by our contract. Each load reads the 32 bytes of one `LANES`
            // element chunk of `values` (any alignment); the last transmute reinterprets a
            // register as its lanes.
            unsafe {
                let mask = $splat;
                let mut acc = [_mm256_setzero_si256(); 4];
                let mut blocks = values.chunks_exact(4 * LANES);
                for block in &mut blocks {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let p = block.as_ptr().add(k * LANES).cast::<__m256i>();
                        *acc = $max(*acc, _mm256_and_si256(_mm256_loadu_si256(p), mask));
                    }
                }
                let all = $max($max(acc[0], acc[1]), $max(acc[2], acc[3]));
                let lanes = std::mem::transmute::<__m256i, [$bits; LANES]>(all);
                // A loop, not an iterator chain: its closures would be functions of this
                // module outside the audited table at the dev profile.
                let mut best = 0;
                for &lane in &lanes {
                    best = best.max(lane);
                }
                for &v in blocks.remainder() {
                    best = best.max($to_bits(v) & $mask);
                }
                best
            }
        }
    };
}

max_abs_bits_avx2! {
    /// The largest `bits & 0x7fff` over 16-bit float patterns (bf16, f16): their largest
    /// magnitude as a pattern ([`Element::max_abs_bits`](super::vector::Element::max_abs_bits)),
    /// by `vpmaxuw`. Measured on an Intel Xeon: this pass was 6 % of a one-thread checkpoint
    /// merge in its baseline form, 3 % in this one.
    max_abs_bits_avx2_u16(u16) -> u16, 0x7fff, _mm256_set1_epi16(0x7fff), _mm256_max_epu16, u16::from
}

max_abs_bits_avx2! {
    /// As [`max_abs_bits_avx2_u16`], for f32 (`vpmaxud`).
    max_abs_bits_avx2_f32(f32) -> u32, 0x7fff_ffff, _mm256_set1_epi32(0x7fff_ffff), _mm256_max_epu32,
    f32::to_bits
}
