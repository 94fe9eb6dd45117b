//! Split arithmetic: which rows of a source a rank takes, and the byte runs of a slice.
//!
//! Everything here is pure integer math with checked division; the planner has already rejected
//! sizes that do not divide, so these functions take sizes that do.

/// The kv heads rank `rank` holds, as `(first head, count)`, for `kv_heads` heads over `tp` ranks.
///
/// With `tp >= kv_heads` each rank holds one head, shared by `tp / kv_heads` consecutive ranks
/// (rank r holds head `r / (tp / kv_heads)`); otherwise rank r holds block r of `kv_heads / tp`.
pub fn kv_heads_of_rank(kv_heads: usize, tp: usize, rank: usize) -> (usize, usize) {
    if tp >= kv_heads {
        (rank / (tp / kv_heads), 1)
    } else {
        let per = kv_heads / tp;
        (rank * per, per)
    }
}

/// Whether `kv_heads` kv heads can be spread over `tp` ranks (split or replicated evenly).
pub fn kv_heads_fit(kv_heads: usize, tp: usize) -> bool {
    kv_heads > 0 && if tp >= kv_heads { tp % kv_heads == 0 } else { kv_heads % tp == 0 }
}

/// The vocabulary layout of rank `rank`: `(real rows start, real rows count, zero rows)` in a
/// tensor of `rows` rows padded to a multiple of `pad_to` and split evenly over `tp` ranks.
pub fn vocab_rows_of_rank(rows: usize, pad_to: usize, tp: usize, rank: usize) -> (usize, usize, usize) {
    let padded = padded_rows(rows, pad_to);
    let per = padded / tp;
    let start = rank * per;
    let real = rows.saturating_sub(start).min(per);
    (start.min(rows), real, per - real)
}

/// `rows` rounded up to a multiple of `pad_to`.
pub fn padded_rows(rows: usize, pad_to: usize) -> usize {
    rows.div_ceil(pad_to) * pad_to
}

/// Byte runs `(offset, len)` of the slice `start..end` along `dim` of a row-major tensor with
/// `shape` and `elem` bytes per element; adjacent runs are merged.
pub fn byte_runs(shape: &[usize], elem: usize, dim: usize, start: usize, end: usize) -> Vec<(usize, usize)> {
    if shape.is_empty() {
        return vec![(0, elem)];
    }
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
    let row = shape[dim] * inner;
    let len = (end - start) * inner;
    if len == row || outer == 1 {
        // Whole rows at every outer index (or a single block): one contiguous run.
        return vec![(start * inner, len * if len == row { outer } else { 1 })];
    }
    (0..outer).map(|o| (o * row + start * inner, len)).collect()
}

/// The byte runs `(source, offset in its data, len)` that `piece` reads, in the order they are
/// laid out in the output; `elem` gives a source's bytes per element (`None`: unknown source,
/// and then no runs). Zeros and constants read nothing.
pub fn piece_runs<'a>(
    piece: &'a super::Piece,
    elem: &dyn Fn(&str) -> Option<usize>,
) -> Option<Vec<(&'a str, usize, usize)>> {
    use super::Piece;
    match piece {
        Piece::Copy { source, source_shape, dim, start, end, .. } => Some(
            byte_runs(source_shape, elem(source)?, *dim, *start, *end)
                .into_iter()
                .map(|(o, l)| (source.as_str(), o, l))
                .collect(),
        ),
        Piece::Concat { dim, parts, .. } => {
            let Some(first) = parts.first() else { return Some(vec![]) };
            let outer: usize = first.source_shape.get(..*dim)?.iter().product();
            let mut geometry = Vec::with_capacity(parts.len());
            for p in parts {
                let inner = p.source_shape.get(dim + 1..)?.iter().product::<usize>() * elem(&p.source)?;
                geometry.push((
                    p.source.as_str(),
                    p.source_shape[*dim] * inner,
                    p.start * inner,
                    (p.end - p.start) * inner,
                ));
            }
            let mut out = Vec::with_capacity(outer * parts.len());
            for o in 0..outer {
                for &(source, row, at, len) in &geometry {
                    out.push((source, o * row + at, len));
                }
            }
            Some(out)
        }
        Piece::Zeros { .. } | Piece::Constant { .. } => Some(vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_replication() {
        // 2 kv heads over 8 ranks: 4 consecutive ranks share a head.
        let heads: Vec<usize> = (0..8).map(|r| kv_heads_of_rank(2, 8, r).0).collect();
        assert_eq!(heads, [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(kv_heads_of_rank(8, 2, 1), (4, 4));
        assert_eq!(kv_heads_of_rank(3, 6, 5), (2, 1));
        assert!(kv_heads_fit(3, 6) && kv_heads_fit(4, 2) && !kv_heads_fit(3, 2) && !kv_heads_fit(2, 3));
    }

    #[test]
    fn vocab_example_from_the_contract() {
        // 50265 rows, tp=2 -> padded 50304, 25152 per rank; rank 1 holds rows 25152..50264 then 39 zeros.
        assert_eq!(padded_rows(50265, 64), 50304);
        assert_eq!(vocab_rows_of_rank(50265, 64, 2, 0), (0, 25152, 0));
        assert_eq!(vocab_rows_of_rank(50265, 64, 2, 1), (25152, 25113, 39));
        // A rank entirely in the padding.
        assert_eq!(vocab_rows_of_rank(10, 64, 4, 3), (10, 0, 16));
    }

    #[test]
    fn concat_interleaves_the_parts_row_by_row() {
        use crate::plan::{Piece, Slice};
        let part = |s: &str, start, end| Slice { source: s.into(), source_shape: vec![2, 4], start, end };
        let p = Piece::Concat { rows: [0, 2], dim: 1, parts: vec![part("a", 0, 4), part("b", 1, 3)] };
        let runs = piece_runs(&p, &|_| Some(2)).unwrap();
        assert_eq!(runs, vec![("a", 0, 8), ("b", 2, 4), ("a", 8, 8), ("b", 10, 4)]);
        assert_eq!(piece_runs(&p, &|s| (s == "a").then_some(2)), None);
    }

    #[test]
    fn runs() {
        assert_eq!(byte_runs(&[4, 6], 2, 0, 1, 3), vec![(12, 24)]);
        assert_eq!(byte_runs(&[4, 6], 2, 1, 2, 4), vec![(4, 4), (16, 4), (28, 4), (40, 4)]);
        assert_eq!(byte_runs(&[4, 6], 2, 1, 0, 6), vec![(0, 48)]);
        assert_eq!(byte_runs(&[], 4, 0, 0, 1), vec![(0, 4)]);
    }
}
