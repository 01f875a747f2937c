//! The half types by their bits: bit patterns (∞, NaN, subnormals) and ulp distances.

use half::{bf16, f16};
use ndarray::ArrayView2;
use ndlora::LoraFloat;
use safetensors::Dtype;

/// `bf16` or `f16`, with its safetensors dtype and its bits.
pub trait Half: LoraFloat<Factor = f32> {
    const DTYPE: Dtype;
    /// The exponent field, all ones: the bits of +∞ (mantissa 0) and of every NaN.
    const EXPONENT: u16;
    fn bits(self) -> u16;
    fn from_le(b: [u8; 2]) -> Self;
    fn from_bits(b: u16) -> Self;

    /// The mantissa field.
    fn mantissa() -> u16 {
        0x7fff & !Self::EXPONENT
    }

    /// +∞, −∞, a quiet NaN, a signalling NaN (payload 1) and a negative quiet NaN.
    fn nonfinite_bits() -> [u16; 5] {
        let quiet = Self::EXPONENT | (Self::mantissa() + 1) >> 1;
        [
            Self::EXPONENT,
            0x8000 | Self::EXPONENT,
            quiet,
            Self::EXPONENT | 1,
            0x8000 | quiet,
        ]
    }

    /// The smallest and the largest positive subnormal, and the smallest negative one.
    fn subnormals() -> [Self; 3] {
        [
            Self::from_bits(1),
            Self::from_bits(Self::mantissa()),
            Self::from_bits(0x8001),
        ]
    }
}

impl Half for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    const EXPONENT: u16 = 0x7f80;
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn from_le(b: [u8; 2]) -> Self {
        bf16::from_le_bytes(b)
    }
    fn from_bits(b: u16) -> Self {
        bf16::from_bits(b)
    }
}

impl Half for f16 {
    const DTYPE: Dtype = Dtype::F16;
    const EXPONENT: u16 = 0x7c00;
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn from_le(b: [u8; 2]) -> Self {
        f16::from_le_bytes(b)
    }
    fn from_bits(b: u16) -> Self {
        f16::from_bits(b)
    }
}

/// How many representable values of `H` lie between `a` and `b` (0 when equal; +0 = −0).
pub fn ulps<H: Half>(a: H, b: H) -> u32 {
    let ordered = |v: H| {
        let bits = v.bits();
        if bits & 0x8000 != 0 {
            -i32::from(bits & 0x7fff)
        } else {
            i32::from(bits)
        }
    };
    ordered(a).abs_diff(ordered(b))
}

/// (largest ulp distance, fraction of elements equal bit for bit).
pub fn ulp_stats<H: Half>(got: ArrayView2<'_, H>, want: ArrayView2<'_, H>) -> (u32, f64) {
    assert_eq!(got.dim(), want.dim());
    let mut max = 0;
    let mut equal = 0usize;
    for (&g, &w) in got.iter().zip(want.iter()) {
        let u = ulps(g, w);
        max = max.max(u);
        equal += usize::from(u == 0);
    }
    (max, equal as f64 / got.len().max(1) as f64)
}
