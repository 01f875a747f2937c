//! Arrays ndlora owns, placed on a cache-line (64-byte) boundary. A kernel's vector loads of
//! such a row-major array never straddle two cache lines when its row length is a multiple of
//! the lanes; on an AVX-512 CPU a 64-byte load 16 bytes off a boundary reads from L2 at about
//! half the rate of an aligned one (MicroLora's rank-2 forward at H = 4096 measured 1.6× faster
//! with its factors aligned). ndarray allocates with the element's own alignment (malloc gives
//! 16 bytes), so an aligned array is a slice of a slightly larger buffer.

use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2};
use num_traits::Zero;

/// The boundary, in bytes.
const ALIGN: usize = 64;

/// `m` in standard layout with its first element on a 64-byte boundary (unless it is empty):
/// `m` itself when it already is, else a copy. The copy holds up to 64 bytes more than `m`;
/// a clone of it is not aligned again (clone with this function, or hold an
/// [`AlignedMatrix`], where that matters).
pub(crate) fn aligned_standard<A: Copy + Zero>(m: Array2<A>) -> Array2<A> {
    if m.is_empty() || (m.is_standard_layout() && (m.as_ptr() as usize).is_multiple_of(ALIGN)) {
        return m;
    }
    aligned_copy(m.view())
}

/// A standard-layout copy of `m` whose first element is on a 64-byte boundary.
fn aligned_copy<A: Copy + Zero>(m: ArrayView2<'_, A>) -> Array2<A> {
    let (rows, cols) = m.dim();
    let len = rows * cols;
    let pad = ALIGN / std::mem::size_of::<A>().max(1);
    let buf = vec![A::zero(); len + pad];
    let offset = buf.as_ptr().align_offset(ALIGN).min(pad);
    let mut out = Array1::from_vec(buf)
        .slice_move(s![offset..offset + len])
        .into_shape_with_order((rows, cols))
        .expect("a contiguous slice of rows·cols elements");
    out.assign(&m);
    out
}

/// A matrix ndlora owns (a layer's W) kept in standard layout on a 64-byte boundary, clones
/// included, so that the kernels' vector loads of its rows never straddle two cache lines
/// when the row length is a multiple of the lanes. Reads go through `Deref`; writes through
/// [`view_mut`](Self::view_mut), which cannot move the buffer.
#[derive(Debug, PartialEq)]
pub(crate) struct AlignedMatrix<A>(Array2<A>);

impl<A: Copy + Zero> AlignedMatrix<A> {
    /// `m` itself when already aligned and standard, else an aligned copy (`m` is freed).
    pub(crate) fn new(m: Array2<A>) -> Self {
        Self(aligned_standard(m))
    }

    /// The array, still aligned (a layer built from it keeps it without a copy).
    pub(crate) fn into_inner(self) -> Array2<A> {
        self.0
    }

    /// A mutable view of the elements.
    pub(crate) fn view_mut(&mut self) -> ArrayViewMut2<'_, A> {
        self.0.view_mut()
    }
}

impl<A: Copy + Zero> Clone for AlignedMatrix<A> {
    fn clone(&self) -> Self {
        Self(aligned_copy(self.0.view()))
    }
}

impl<A> std::ops::Deref for AlignedMatrix<A> {
    type Target = Array2<A>;

    fn deref(&self) -> &Array2<A> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ShapeBuilder};

    use super::*;

    #[test]
    fn aligned_copies_keep_the_values() {
        for (rows, cols) in [(0, 0), (1, 1), (2, 7), (3, 33), (2, 4096)] {
            let c = Array2::from_shape_fn((rows, cols), |(i, j)| (i * 1000 + j) as f32);
            let mut f = Array2::zeros((rows, cols).f());
            f.assign(&c);
            for m in [c.clone(), f] {
                let a = aligned_standard(m);
                assert_eq!(a, c);
                assert!(a.is_standard_layout());
                let aligned = (a.as_ptr() as usize).is_multiple_of(ALIGN);
                assert!(a.is_empty() || aligned, "{rows}×{cols}");
            }
        }
    }

    #[test]
    fn aligned_matrices_stay_aligned_when_cloned_and_written() {
        for (rows, cols) in [(1, 1), (3, 33), (5, 7)] {
            let c = Array2::from_shape_fn((rows, cols), |(i, j)| (i * 100 + j) as f64);
            // A standard-layout array that starts off the boundary on purpose: a slice of a
            // larger buffer, one or two elements in.
            let buf = Array1::<f64>::zeros(rows * cols + 2);
            let off = if (buf.as_ptr() as usize + 8).is_multiple_of(ALIGN) {
                2
            } else {
                1
            };
            let mut shifted = buf
                .slice_move(s![off..off + rows * cols])
                .into_shape_with_order((rows, cols))
                .unwrap();
            shifted.assign(&c);
            assert!(!(shifted.as_ptr() as usize).is_multiple_of(ALIGN));
            let mut m = AlignedMatrix::new(shifted);
            m.view_mut()[[0, 0]] = 42.0;
            let copy = m.clone();
            for a in [&m, &copy] {
                assert!((a.as_ptr() as usize).is_multiple_of(ALIGN));
                assert!(a.is_standard_layout());
                assert_eq!(a[[0, 0]], 42.0);
                assert_eq!(a.slice(s![.., 1..]), c.slice(s![.., 1..]));
            }
            assert_eq!(m, copy);
        }
    }
}
