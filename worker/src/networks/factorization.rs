//! Integer factorizations used to shape LoKr, DIAG-OFT and BOFT adapters.
//!
//! Both functions are literal ports of LyCORIS `lycoris/functional/general.py`
//! (`factorization`, `power2factorization`), because the shapes they pick are part of the
//! file format: a loader rebuilds an adapter from the tensor shapes, so Loft must choose
//! exactly the shapes LyCORIS chooses.

/// Splits `dimension` into `(m, n)` with `m * n == dimension` and `m <= n`.
///
/// With `factor > 0` dividing `dimension`, the split is `(factor, dimension / factor)`
/// (ordered so the smaller comes first). Otherwise the most balanced split whose smaller
/// part does not exceed `factor` (any size when `factor < 0`) is returned, searching upward
/// from `(1, dimension)` and stopping as soon as `m + n` would grow.
///
/// Examples (dimension → factor −1, 2, 4, 8, 16), as the code computes them:
/// 128 → (8,16) (2,64) (4,32) (8,16) (8,16); 250 → (10,25) (2,125) (2,125) (5,50) (10,25);
/// 360 → (18,20) (2,180) (4,90) (8,45) (15,24). The LyCORIS docstring's row for 360 says
/// (8,45) and (12,30) for −1 and 16: it is stale (the loop never updates `length`, so it keeps
/// going while m < n), and the code — which decides the saved shapes — is what we port.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension % (factor as usize) == 0 {
        let m = factor as usize;
        let n = dimension / m;
        return if m > n { (n, m) } else { (m, n) };
    }
    let factor = if factor < 0 { dimension } else { factor as usize };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// BOFT's split of `dimension` into `(block_size, block_num)`: `block_size` even and at most
/// `factor` (any size when `factor == -1`), `block_num` a power of two, product `dimension`.
/// Among the valid splits it keeps the one with the largest even `block_size` ≤ `factor`
/// (the LyCORIS loop overwrites its answer each time it finds a new one).
/// Returns `None` when no split exists (e.g. odd widths, or `factor < 2`).
pub fn power2factorization(dimension: usize, factor: i64) -> Option<(usize, usize)> {
    let factor: i64 = if factor == -1 { dimension as i64 } else { factor };
    // Literal port of the Python loop; m walks even numbers dividing `dimension`.
    let mut m: i64 = 0;
    let mut n: usize = 0;
    let dim = dimension as i64;
    while m <= factor {
        m += 2;
        while dim % m != 0 && m < dim {
            m += 2;
        }
        if m > factor {
            break;
        }
        let quotient = dim / m;
        if quotient > 0 && (quotient as u64).count_ones() == 1 && dim % m == 0 {
            n = quotient as usize;
        }
    }
    if n == 0 {
        None
    } else {
        Some((dimension / n, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_matches_the_lycoris_table() {
        // rows: dimension, then results for factor -1, 2, 4, 8, 16. This is the docstring's
        // table except 360/−1 and 360/16, where the docstring is stale; these values were
        // checked by running LyCORIS's own Python function.
        let table: [(usize, [(usize, usize); 5]); 6] = [
            (127, [(1, 127), (1, 127), (1, 127), (1, 127), (1, 127)]),
            (128, [(8, 16), (2, 64), (4, 32), (8, 16), (8, 16)]),
            (250, [(10, 25), (2, 125), (2, 125), (5, 50), (10, 25)]),
            (360, [(18, 20), (2, 180), (4, 90), (8, 45), (15, 24)]),
            (512, [(16, 32), (2, 256), (4, 128), (8, 64), (16, 32)]),
            (1024, [(32, 32), (2, 512), (4, 256), (8, 128), (16, 64)]),
        ];
        let factors = [-1i64, 2, 4, 8, 16];
        for (dim, expected) in table {
            for (f, want) in factors.iter().zip(expected) {
                assert_eq!(factorization(dim, *f), want, "factorization({dim}, {f})");
            }
        }
    }

    #[test]
    fn factorization_examples_from_algorithms_md() {
        // DIAG-OFT blocks: 320, r=4 → 4×80; 320, r=32 → 10×32.
        assert_eq!(factorization(320, 4), (4, 80));
        assert_eq!(factorization(320, 32), (10, 32));
        // LoKr: 320 with factor -1 → 16×20; 640 and 2048 with factor 8.
        assert_eq!(factorization(320, -1), (16, 20));
        assert_eq!(factorization(640, 8), (8, 80));
        assert_eq!(factorization(2048, 8), (8, 256));
    }

    #[test]
    fn power2factorization_examples() {
        // 320 = 10 · 32 needs block size ≥ 10.
        assert_eq!(power2factorization(320, 10), Some((10, 32)));
        assert_eq!(power2factorization(320, 8), None);
        assert_eq!(power2factorization(320, 4), None);
        // Larger factor keeps the largest admissible even block: 320 = 20 · 16, 40 · 8, 80 · 4…
        assert_eq!(power2factorization(320, 32), Some((20, 16)));
        assert_eq!(power2factorization(64, 8), Some((8, 8)));
        assert_eq!(power2factorization(64, 4), Some((4, 16)));
        // Odd widths never factor.
        assert_eq!(power2factorization(37, 8), None);
        assert_eq!(power2factorization(37, -1), None);
        // factor -1: largest even block, i.e. block_num 2 when possible.
        assert_eq!(power2factorization(64, -1), Some((64, 1)));
    }
}
