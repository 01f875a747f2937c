//! [`LoraScratch`]: the reusable working memory of a forward (the n×r temporaries of the
//! LoRA branches).

use ndarray::ArrayViewMut2;

use num_traits::Zero;

/// The working memory of a skinny forward (`matmul::skinny_forward`'s `buffer`): the first
/// `len` elements of `scratch` when there is one (no allocation once it is large enough),
/// else of `owned`, grown to `len`.
pub(crate) fn buffer_of<'s, 't: 's, A: Copy + Zero>(
    scratch: &'s mut Option<&'t mut LoraScratch<A>>,
    owned: &'s mut Vec<A>,
) -> impl FnOnce(usize) -> &'s mut [A] + use<'s, 't, A> {
    move |len| match scratch {
        Some(scratch) => scratch.slice_mut(len),
        None => grown(owned, len),
    }
}

/// Reusable working memory for [`LoraLayer::forward_into_with_scratch`](crate::LoraLayer::forward_into_with_scratch):
/// holds the n×r temporary X Aᵀ of the LoRA branch, grows to the largest n·r asked of it,
/// never shrinks. When a forward of a few rows (the skinny kernel, n ≤ `N_SKINNY`) gets an X
/// whose rows lie a multiple of 4 KiB apart (k = 1024, 2048, 4096 … in f32), it also holds a
/// copy of X padded to a stride the L1 cache serves without set conflicts (n·(k + 16)
/// elements): [`with_capacity`](Self::with_capacity) does not reserve that, so the first such
/// call grows the scratch, later ones do not. One scratch per thread (it is `&mut` during a forward); it can serve
/// layers of any shape. For a half-precision layer (`LoraLayer<bf16>`, `<f16>`, whose
/// scratch is `LoraScratch<f32>`) it also keeps the f32 working copies that forward makes:
/// X widened (n×k), the f32 accumulator (n×d) and, above the skinny crossover, one panel of
/// W widened (about 4 MiB), so that a forward with a scratch allocates nothing once the
/// scratch has grown.
///
/// ```
/// let mut scratch = ndlora::LoraScratch::<f64>::with_capacity(32, 8);
/// assert!(scratch.capacity() >= 32 * 8);
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoraScratch<A> {
    buf: Vec<A>,
    /// The half-precision forward's widened X and accumulator (`widened::forward`).
    wide: Vec<A>,
    /// The half-precision forward's widened panel of W.
    panel: Vec<A>,
}

impl<A: Copy + Zero> LoraScratch<A> {
    /// An empty scratch (allocates on first use).
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            wide: Vec::new(),
            panel: Vec::new(),
        }
    }

    /// A scratch that serves batches of up to `n` rows at rank up to `r` without allocating.
    ///
    /// # Panics
    /// If n·r overflows `usize` or the allocation fails (as `Vec::with_capacity`).
    #[track_caller]
    pub fn with_capacity(n: usize, r: usize) -> Self {
        let len = n
            .checked_mul(r)
            .expect("LoraScratch::with_capacity: n·r overflows usize");
        Self {
            buf: vec![A::zero(); len],
            ..Self::new()
        }
    }

    /// How many elements it holds now (n·r it serves without allocating).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// An n×r standard-layout view of the first n·r elements, growing the buffer if needed.
    /// (n·r cannot overflow: n ≤ the rows of an existing n×k input and r ≤ k.)
    pub(crate) fn view_mut(&mut self, n: usize, r: usize) -> ArrayViewMut2<'_, A> {
        ArrayViewMut2::from_shape((n, r), self.slice_mut(n * r)).expect("n·r elements")
    }

    /// The first `len` elements, growing the buffer if needed.
    pub(crate) fn slice_mut(&mut self, len: usize) -> &mut [A] {
        grown(&mut self.buf, len)
    }

    /// Elements held in all its buffers.
    pub(crate) fn retained(&self) -> usize {
        self.buf.len() + self.wide.len() + self.panel.len()
    }

    /// Takes the half-precision forward's two buffers (widened operands, panel) out of the
    /// scratch, so that the scratch itself can still serve the n×r temporary meanwhile; give
    /// them back with [`put_wide`](Self::put_wide).
    pub(crate) fn take_wide(&mut self) -> (Vec<A>, Vec<A>) {
        (
            std::mem::take(&mut self.wide),
            std::mem::take(&mut self.panel),
        )
    }

    /// Returns the buffers [`take_wide`](Self::take_wide) took.
    pub(crate) fn put_wide(&mut self, (wide, panel): (Vec<A>, Vec<A>)) {
        (self.wide, self.panel) = (wide, panel);
    }
}

/// The first `len` elements of `buf`, grown with zeros if it is shorter.
pub(crate) fn grown<A: Copy + Zero>(buf: &mut Vec<A>, len: usize) -> &mut [A] {
    if buf.len() < len {
        buf.resize(len, A::zero());
    }
    &mut buf[..len]
}
