//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in ndlora. Each variant names what was expected and what came.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum LoraError {
    /// An array or slice had the wrong shape or length.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which argument or part.
        what: &'static str,
        /// The shape that was required, e.g. `[7, 33]` or `[_, 33]` (`_` = any).
        expected: String,
        /// The shape that came.
        got: String,
    },
    /// A rank outside the allowed range.
    #[error("invalid rank {got}: expected {min} ≤ rank ≤ {max}")]
    InvalidRank {
        /// The rank that came.
        got: usize,
        /// Smallest allowed rank.
        min: usize,
        /// Largest allowed rank (e.g. min(d, k)).
        max: usize,
    },
    /// A configuration value out of its domain (alpha not finite, dropout outside [0, 1), …).
    #[error("invalid {what}: expected {expected}, got {got}")]
    InvalidValue {
        /// Which value.
        what: &'static str,
        /// The domain it must lie in.
        expected: &'static str,
        /// The value that came, formatted.
        got: String,
    },
    /// An input or weight held a NaN or an infinity where finite values are required.
    #[error("non-finite value in {what} at index {index:?}: {value}")]
    NonFinite {
        /// Which array.
        what: &'static str,
        /// Index of the first offending element (row, column; or (0, i) for vectors).
        index: (usize, usize),
        /// The offending value (as f64).
        value: f64,
    },
    /// A merge or unmerge would have written a NaN or ∞ into the weight; nothing was changed.
    #[error(
        "{operation} would overflow the weight to a non-finite value; the weight is unchanged"
    )]
    WouldOverflow {
        /// `"merge"` or `"unmerge"`.
        operation: &'static str,
    },
    /// The operation needs the adapter merged (`true`) or unmerged (`false`), and it was not.
    #[error("{operation} requires merged = {expected}, but merged = {}", !expected)]
    MergeState {
        /// The refused operation.
        operation: &'static str,
        /// The merged state it requires.
        expected: bool,
    },
    /// No adapter with this name (never added, or removed).
    #[error("no adapter named {name:?}")]
    UnknownAdapter {
        /// The name that was asked for.
        name: String,
    },
    /// No adapter with this id (never added, or removed; ids are never reused).
    #[error("no adapter with id {id}")]
    UnknownAdapterId {
        /// The id that was asked for.
        id: usize,
    },
    /// An adapter name given twice: already present in the model, or repeated in a list.
    #[error("adapter name {name:?} is already taken")]
    DuplicateAdapter {
        /// The repeated name.
        name: String,
    },
    /// A size whose product overflows `usize`.
    #[error("size overflow: {what} = {dims:?} does not fit in usize")]
    SizeOverflow {
        /// Which size.
        what: &'static str,
        /// The dimensions whose product overflowed.
        dims: Vec<usize>,
    },
}

/// `Result` with [`LoraError`].
pub type Result<T, E = LoraError> = std::result::Result<T, E>;

/// Formats a shape as `[a, b]`.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}
