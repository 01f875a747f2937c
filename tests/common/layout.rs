//! The input layouts every forward must accept, and a matrix stored in each of them.

use ndarray::{s, Array2, ArrayView2, Axis, ShapeBuilder};
use ndlora::LoraFloat;

/// Input layouts every forward must accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    C,
    F,
    /// Every other row of a larger C array: leading dimension > width.
    RowStrided,
    /// Every other column: no BLAS layout, must be copied.
    ColStrided,
    /// Rows in reverse order: negative stride.
    Reversed,
}

pub const LAYOUTS: [Layout; 5] = [
    Layout::C,
    Layout::F,
    Layout::RowStrided,
    Layout::ColStrided,
    Layout::Reversed,
];

/// Stores `m` in `layout`; the returned view has the same values as `m`.
pub struct Laid<A> {
    storage: Array2<A>,
    layout: Layout,
}

impl<A: LoraFloat> Laid<A> {
    pub fn new(m: &Array2<A>, layout: Layout) -> Self {
        let (r, c) = m.dim();
        let storage = match layout {
            Layout::C => m.as_standard_layout().into_owned(),
            Layout::F => {
                let mut f = Array2::zeros((r, c).f());
                f.assign(m);
                f
            }
            Layout::RowStrided => {
                let mut big = Array2::from_elem((2 * r, c + 3), A::nan());
                big.slice_mut(s![..;2, 1..c + 1]).assign(m);
                big
            }
            Layout::ColStrided => {
                let mut big = Array2::from_elem((r, 2 * c), A::nan());
                big.slice_mut(s![.., ..;2]).assign(m);
                big
            }
            Layout::Reversed => {
                let mut rev = m.to_owned();
                rev.invert_axis(Axis(0));
                rev.as_standard_layout().into_owned()
            }
        };
        Self { storage, layout }
    }

    pub fn view(&self) -> ArrayView2<'_, A> {
        let c = self.storage.ncols();
        match self.layout {
            Layout::C | Layout::F => self.storage.view(),
            Layout::RowStrided => self.storage.slice(s![..;2, 1..c - 2]),
            Layout::ColStrided => self.storage.slice(s![.., ..;2]),
            Layout::Reversed => self.storage.slice(s![..;-1, ..]),
        }
    }
}
