// One LARNN layer over a whole sequence, forward and backward through time, on the CPU.
//
// The equations, their numbering and the algebra (each entry projected once, BN_K and
// BN_V as per-feature affine maps folded into the attention) are larnn.py's; larnn.py
// is the reference this file is tested against (tests/test_fused.py). What this file
// adds is where the time goes: the loop over time runs here, not in Python, and
// autograd is replaced by a hand-written backward that keeps only what it needs:
//
//   * weight gradients are summed by one large matrix product per weight after the
//     backward loop, not by T small ones;
//   * the window's keys and values live once, batch-major [B, n, 2H] (keys in the first
//     H features, values in the last H), and the window at a step is a slice of it;
//     with positional encoding each step builds its window in a scratch buffer that is
//     rebuilt in the backward, never kept;
//   * the attention dropout mask is a hash of (seed, step, slot, sample, head), drawn
//     again in the backward instead of being stored;
//   * the attention (scores, softmax, dropout, read, BN_V) is one pass per sample, and
//     its backward another, adding straight to the entries' gradients; without pe the
//     parts of an entry's gradient that depend on its value alone (ELU', BN_K's and
//     BN_V's moments) are applied once per entry, not once per window that holds it;
//   * the cell update (BN_z, gates, c, BN_c, h, BN_h, hidden dropout), and each small
//     piece around the attention (the query, the entries' ELU and moments, BN_K's and
//     BN_V's affine maps, BN_a), is a few passes on all threads, each thread keeping
//     its own block of samples in every pass (and one partial sum per block for the
//     BatchNorms' sums over the batch);
//   * these loops are plain C++ that g++ vectorises (hence the branch-free exp), the
//     attention's with ATen's vector types; the matrix products call ATen (and, with
//     pe, the window's construction);
//   * without autograd, the buffers only the backward reads hold one step, not T.
//
// Head i holds the features f with f % heads == i, as in larnn.head_dot.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace {

using at::Tensor;

// The six BatchNorms of a layer, in the order the Python side passes them.
enum Norm { KEYS, VALUES, ATTENTION, GATES, CELL, HIDDEN, NORMS };

// A 32-bit integer hash with good avalanche (Wellons' "lowbias32"); 32-bit products
// vectorise, 64-bit ones would not, and the backward draws every mask again.
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  return x ^ (x >> 16);
}

// Dropout by hashing: element i is kept when 24 bits of the hash of i (and a seed) are
// at or above p * 2^24, and then scaled by 1 / (1 - p), as F.dropout scales. The
// attention's element (step, sample, slot, head) is the i of its place in [T, B, k, heads],
// so that a sample's window at a step is one run of i, drawn by one vectorised loop.
struct Dropout {
  uint32_t seed = 0, threshold = 0;
  double scale = 1.0;
  int64_t window = 1, batch = 1, heads = 1;
  bool active = false;

  Dropout() = default;
  Dropout(uint64_t seed, double p, int64_t window, int64_t batch, int64_t heads)
      : seed(static_cast<uint32_t>(seed ^ (seed >> 32))),
        threshold(static_cast<uint32_t>(std::llround(p * 16777216.0))),
        scale(1.0 / (1.0 - p)), window(window), batch(batch), heads(heads), active(p > 0) {}

  // mask[j, h] for the slots j < w of sample b's window at `step` (1 without dropout).
  template <typename scalar_t>
  void fill(int64_t step, int64_t b, int64_t w, scalar_t* __restrict__ mask) const {
    if (!active) {
      std::fill(mask, mask + w * heads, scalar_t(1));
      return;
    }
    fill_from((uint32_t(step) * batch + b) * window * heads, w * heads, mask);
  }

  // out[k] for the elements i = first + k, k < n: 0 or 1 / (1 - p).
  template <typename scalar_t>
  void fill_from(uint32_t first, int64_t n, scalar_t* __restrict__ out) const {
    // members copied to locals: g++ would not vectorise a loop that reads them
    const uint32_t seed = this->seed, threshold = this->threshold;
    const scalar_t keep = scalar_t(scale);
    for (int64_t k = 0; k < n; ++k)
      out[k] = hash32((first + uint32_t(k)) * 0x9E3779B9U + seed) >> 8 >= threshold ? keep
                                                                                   : scalar_t(0);
  }
};

// exp(x), with no branch and no library call, so that g++ vectorises the loops that use
// it: exp(x) = 2^n exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2, exp(r) by its
// Taylor polynomial to the type's precision (the remainder r^(N+1) / (N+1)! is 5e-9 for
// float's N = 7, 4e-18 for double's N = 13), by Horner's rule (N multiply-adds); ln 2 is
// split in two (Cody and Waite) so that r is exact. x is clamped to the range where 2^n
// is a normal number: the sigmoid's saturated tails and ELU's negative ones lose nothing.
template <typename scalar_t> struct ExpConstants;
template <> struct ExpConstants<float> {
  using bits_t = int32_t;
  static constexpr int terms = 7, mantissa = 23, bias = 127;
  static constexpr float lowest = -87.0f, highest = 88.0f, ln2_hi = 0.693359375f,
                         ln2_lo = -2.12194440e-4f;
};
template <> struct ExpConstants<double> {
  using bits_t = int64_t;
  static constexpr int terms = 13, mantissa = 52, bias = 1023;
  static constexpr double lowest = -708.0, highest = 709.0, ln2_hi = 6.93147180369123816490e-01,
                          ln2_lo = 1.90821492927058770002e-10;
};

// The Taylor coefficients 1 / k!, k = 0..N, rounded once from double.
template <typename scalar_t, int N>
struct InverseFactorials {
  scalar_t c[N + 1] = {};
  constexpr InverseFactorials() {
    double factorial = 1;
    for (int k = 0; k <= N; ++k) {
      factorial *= k > 0 ? k : 1;
      c[k] = scalar_t(1.0 / factorial);
    }
  }
};

template <typename scalar_t>
inline scalar_t exp_clamped(scalar_t x) {
  using E = ExpConstants<scalar_t>;
  static constexpr InverseFactorials<scalar_t, E::terms> taylor{};
  x = std::min(std::max(x, E::lowest), E::highest);
  const scalar_t n = std::floor(x * scalar_t(1.44269504088896341) + scalar_t(0.5));
  const scalar_t r = (x - n * E::ln2_hi) - n * E::ln2_lo;
  scalar_t series = taylor.c[E::terms];
#pragma GCC unroll 16
  for (int k = E::terms - 1; k >= 0; --k) series = series * r + taylor.c[k];
  const typename E::bits_t exponent =
      static_cast<typename E::bits_t>(static_cast<typename E::bits_t>(n) + E::bias) << E::mantissa;
  scalar_t two_n;
  std::memcpy(&two_n, &exponent, sizeof two_n);
  return series * two_n;
}

// Asks for the n values at x to be brought into the cache ahead of their use.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* x, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(x);
  for (int64_t offset = 0; offset < n * int64_t(sizeof(scalar_t)); offset += 64)
    __builtin_prefetch(bytes + offset);
}

// ---- The work split over the threads ----
//
// Every pass over [B, ...] arrays gives each thread one block of rows (samples), the
// same block in every pass and step (by_rows), so that a thread mostly reads what it
// wrote itself, from its own cache. The sums over the batch (the BatchNorms' statistics
// and the sums in their backward) are taken the same way, one partial sum per block,
// added in block order (BlockSums): their rounding depends on the number of threads,
// not on the threads' timing. Split by features, each thread read rows the other had
// just written, and those passes took longer on two threads than on one; and writes
// split by features met in the cache line at each row's boundary.

// Blocks of at least 16 rows, at most one per thread.
inline int64_t row_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + 15) / 16));
}

// The first row of block i of `blocks` over rows [0, B).
inline int64_t block_start(int64_t i, int64_t blocks, int64_t B) { return i * B / blocks; }

// body(i, b0, b1) for each block i of rows [b0, b1) of [0, B), block i on thread i.
template <typename Body>
void for_blocks(int64_t B, const Body& body) {
  const int64_t blocks = row_blocks(B);
  at::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      body(i, block_start(i, blocks, B), block_start(i + 1, blocks, B));
  });
}

template <typename Body>
void by_rows(int64_t B, const Body& body) {
  for_blocks(B, [&](int64_t, int64_t b0, int64_t b1) { body(b0, b1); });
}

// n sums over rows [0, B), one partial sum per block of by_rows (at least 16 values, a
// cache line, apart: no two threads write into one line); run(block) has
// block(b0, b1, sums) add rows [b0, b1)'s terms to its block's sums [n] (zeroed).
template <typename scalar_t>
struct BlockSums {
  int64_t B, blocks, stride;
  std::vector<scalar_t> sums;

  BlockSums(int64_t B, int64_t n)
      : B(B), blocks(row_blocks(B)), stride(n + 16), sums(blocks * stride) {}

  template <typename Block>
  BlockSums& run(const Block& block) {
    for_blocks(B, [&](int64_t i, int64_t b0, int64_t b1) { block(b0, b1, (*this)[i]); });
    return *this;
  }
  scalar_t* operator[](int64_t i) { return sums.data() + i * stride; }
  int64_t rows(int64_t i) const {
    return block_start(i + 1, blocks, B) - block_start(i, blocks, B);
  }

  // out[k - k0] = scale * (the sum k over the batch), k in [k0, k1)
  void total(int64_t k0, int64_t k1, scalar_t scale, scalar_t* out) {
    for (int64_t k = k0; k < k1; ++k) {
      scalar_t sum = 0;
      for (int64_t i = 0; i < blocks; ++i) sum += (*this)[i][k];
      out[k - k0] = scale * sum;
    }
  }
};

// The attention (eq. 4 and BN_V), one sample at a time. Head h holds the features
// f = i * heads + h, i < d, so a head's dot product is a sum of d vectors of all heads:
// every loop runs over the heads in chunks of one vector (at::vec::Vectorized), the last
// chunk partial (masked loads and stores with AVX-512). For a head count like 27, g++
// alone ran a 16-wide vector, an 8-wide one and 3 scalar iterations, and those scalar
// iterations were most of the time. The window [B, w, 2H] is read through its strides (rows hold
// keys in [0, H), values in [H, 2H)); probabilities are [B, w, heads].
struct Attention {
  int64_t B, w, H, heads, batch_stride, row;

  Attention(const Tensor& window, int64_t heads)
      : B(window.size(0)), w(window.size(1)), H(window.size(2) / 2), heads(heads),
        batch_stride(window.stride(0)), row(window.stride(1)) {}

  // With qs [B, H] the query already scaled (BN_K's scale / sqrt(d)), for every b:
  //   p[b, j, h]     = softmax over j of sum_{f in h} qs[b, f] key[b, j, f]   (saved)
  //   p_sum[b, h]    = sum_j dropout(p)[b, j, h]
  //   read[b, f]     = sum_j dropout(p)[b, j, h(f)] value[b, j, f]
  //   read_bn[b, f]  = v_scale[f] read[b, f] + v_shift[f] p_sum[b, h(f)]   (BN_V)
  // (read_bn = read where v_scale is null: no BN_V).
  template <typename scalar_t>
  void forward(const scalar_t* qs_all, const scalar_t* window, const scalar_t* v_scale,
               const scalar_t* v_shift, const Dropout& drop, int64_t step, scalar_t* p_all,
               scalar_t* p_sum_all, scalar_t* read_all, scalar_t* read_bn_all) const {
    by_rows(B, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> mask(w * heads);
      for (int64_t b = b0; b < b1; ++b) {
        drop.fill(step, b, w, mask.data());
        const scalar_t* kv = window + b * batch_stride;
        forward_sample(qs_all + b * H, kv, b + 1 < b1 ? kv + batch_stride : nullptr, w, row, H,
                       heads, v_scale, v_shift, mask.data(), p_all + b * w * heads,
                       p_sum_all + b * heads, read_all + b * H, read_bn_all + b * H);
      }
    });
  }

  // The backward of forward, from d_read_bn [B, H]: returns d_qs [B, H] and adds the
  // window's gradient (keys and values, before BN_K, BN_V and the activation) to
  // d_window, read through strides like the window.
  template <typename scalar_t>
  void backward(const scalar_t* p_all, const scalar_t* qs_all, const scalar_t* window,
                const scalar_t* v_scale, const scalar_t* v_shift, const Dropout& drop,
                int64_t step, const scalar_t* d_read_bn_all, scalar_t* d_qs_all,
                scalar_t* d_window, int64_t d_batch_stride, int64_t d_row) const {
    by_rows(B, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> scratch(2 * w * heads + H);  // mask, d_p, d_read
      scalar_t* mask = scratch.data();
      scalar_t* d_p = mask + w * heads;
      scalar_t* d_read = d_p + w * heads;
      for (int64_t b = b0; b < b1; ++b) {
        drop.fill(step, b, w, mask);
        backward_sample(p_all + b * w * heads, qs_all + b * H, window + b * batch_stride, w,
                        row, H, heads, v_scale, v_shift, mask, d_read_bn_all + b * H,
                        d_qs_all + b * H, d_window + b * d_batch_stride, d_row, d_p, d_read);
      }
    });
  }

 private:
  // One sample's forward: q [H], its window kv [w, row] (and the next sample's, prefetched,
  // or null), the dropout mask [w, heads] (overwritten by dropout(p)). Writes p
  // [w, heads], p_sum [heads], read and read_bn [H]. Its pointers are __restrict__
  // arguments, its sizes values: g++ honours neither a local pointer's __restrict__ nor a
  // member's constancy.
  template <typename scalar_t>
  static void forward_sample(const scalar_t* __restrict__ q, const scalar_t* __restrict__ kv,
                             const scalar_t* next_kv, int64_t w, int64_t row, int64_t H,
                             int64_t heads, const scalar_t* __restrict__ v_scale,
                             const scalar_t* __restrict__ v_shift,
                             scalar_t* __restrict__ mask, scalar_t* __restrict__ p,
                             scalar_t* __restrict__ p_sum, scalar_t* __restrict__ read,
                             scalar_t* __restrict__ read_bn) {
    using V = at::vec::Vectorized<scalar_t>;
    const int64_t d = H / heads;
    for (int64_t h0 = 0; h0 < heads; h0 += V::size()) {  // heads [h0, h0 + n)
      const int64_t n = std::min<int64_t>(V::size(), heads - h0);
      V top(-std::numeric_limits<scalar_t>::infinity());
      for (int64_t j = 0; j < w; ++j) {  // the scores, and their maximum over the window
        const scalar_t* key = kv + j * row + h0;
        if (next_kv && h0 == 0) prefetch_row(next_kv + j * row, 2 * H);
        V score(0);
        for (int64_t i = 0; i < d; ++i)
          score = at::vec::fmadd(V::loadu(q + i * heads + h0, n), V::loadu(key + i * heads, n),
                                 score);
        score.store(p + j * heads + h0, n);
        top = at::vec::maximum(top, score);
      }
      V total(0);
      for (int64_t j = 0; j < w; ++j) {  // softmax over j
        const V e = (V::loadu(p + j * heads + h0, n) - top).exp();
        e.store(p + j * heads + h0, n);
        total = total + e;
      }
      const V inverse = V(1) / total;
      V sum(0);
      for (int64_t j = 0; j < w; ++j) {  // p, and dropout(p) in place of the mask
        const V p_j = V::loadu(p + j * heads + h0, n) * inverse;
        p_j.store(p + j * heads + h0, n);
        const V dropped = p_j * V::loadu(mask + j * heads + h0, n);
        dropped.store(mask + j * heads + h0, n);
        sum = sum + dropped;
      }
      sum.store(p_sum + h0, n);
      // the read, each feature's sum over the window in a register, then BN_V
      const scalar_t* values = kv + H + h0;
      for (int64_t i = 0; i < d; ++i) {
        const int64_t f = i * heads + h0;
        V r(0);
        for (int64_t j = 0; j < w; ++j)
          r = at::vec::fmadd(V::loadu(mask + j * heads + h0, n),
                             V::loadu(values + j * row + i * heads, n), r);
        r.store(read + f, n);
        (v_scale ? V::loadu(v_scale + f, n) * r + V::loadu(v_shift + f, n) * sum : r)
            .store(read_bn + f, n);
      }
    }
  }

  // One sample's backward: from d_read_bn [H], d_q [H] written and the window's
  // gradient added to d_kv [w, d_row]; d_p [w, heads] and d_read [H] are scratch.
  template <typename scalar_t>
  static void backward_sample(const scalar_t* __restrict__ p, const scalar_t* __restrict__ q,
                              const scalar_t* __restrict__ kv, int64_t w, int64_t row,
                              int64_t H, int64_t heads, const scalar_t* __restrict__ v_scale,
                              const scalar_t* __restrict__ v_shift,
                              const scalar_t* __restrict__ mask,
                              const scalar_t* __restrict__ d_read_bn, scalar_t* __restrict__ d_q,
                              scalar_t* __restrict__ d_kv, int64_t d_row,
                              scalar_t* __restrict__ d_p, scalar_t* __restrict__ d_read) {
    using V = at::vec::Vectorized<scalar_t>;
    const int64_t d = H / heads;
    for (int64_t h0 = 0; h0 < heads; h0 += V::size()) {  // heads [h0, h0 + n)
      const int64_t n = std::min<int64_t>(V::size(), heads - h0);
      V d_sum(0);  // BN_V: d_read, and d_sum of p_sum
      for (int64_t i = 0; i < d; ++i) {
        const int64_t f = i * heads + h0;
        const V g = V::loadu(d_read_bn + f, n);
        if (v_shift) d_sum = at::vec::fmadd(g, V::loadu(v_shift + f, n), d_sum);
        (v_scale ? g * V::loadu(v_scale + f, n) : g).store(d_read + f, n);
      }
      V dot(0);  // sum_j p d_p
      for (int64_t j = 0; j < w; ++j) {  // the read: the values' gradient and d_p
        const V p_j = V::loadu(p + j * heads + h0, n), m_j = V::loadu(mask + j * heads + h0, n);
        const V dropped = p_j * m_j;
        const scalar_t* value = kv + j * row + H + h0;
        scalar_t* d_value = d_kv + j * d_row + H + h0;
        V acc = d_sum;
        for (int64_t i = 0; i < d; ++i) {
          const V g = V::loadu(d_read + i * heads + h0, n);
          acc = at::vec::fmadd(g, V::loadu(value + i * heads, n), acc);
          at::vec::fmadd(dropped, g, V::loadu(d_value + i * heads, n))
              .store(d_value + i * heads, n);
        }
        const V d_p_j = acc * m_j;
        d_p_j.store(d_p + j * heads + h0, n);
        dot = at::vec::fmadd(p_j, d_p_j, dot);
      }
      for (int64_t j = 0; j < w; ++j) {  // softmax: d_score, in place of d_p
        scalar_t* d_score = d_p + j * heads + h0;
        (V::loadu(p + j * heads + h0, n) * (V::loadu(d_score, n) - dot)).store(d_score, n);
      }
      // the scores: the keys' gradient, and the query's summed in a register
      for (int64_t i = 0; i < d; ++i) {
        const int64_t f = i * heads + h0;
        const V q_i = V::loadu(q + f, n);
        V d_q_i(0);
        for (int64_t j = 0; j < w; ++j) {
          const V d_score = V::loadu(d_p + j * heads + h0, n);
          scalar_t* d_key = d_kv + j * d_row + f;
          d_q_i = at::vec::fmadd(d_score, V::loadu(kv + j * row + f, n), d_q_i);
          at::vec::fmadd(d_score, q_i, V::loadu(d_key, n)).store(d_key, n);
        }
        d_q_i.store(d_q + f, n);
      }
    }
  }
};

// ELU'(x) from y = ELU(x): 1 for y > 0, else y + 1.
template <typename scalar_t>
inline scalar_t elu_grad(scalar_t y) {
  return y > 0 ? scalar_t(1) : y + scalar_t(1);
}

// The gradient d [F] of a row x [F] of activated keys and values, completed in place:
// plus BN_K's and BN_V's share through the batch moments, mean_part + square_part * x
// (where given), times ELU' (with activation), from the activated value x.
template <typename scalar_t>
void complete_gradient_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mean_part,
                           const scalar_t* __restrict__ square_part, bool activation, int64_t F,
                           scalar_t* __restrict__ d) {
  for (int64_t f = 0; f < F; ++f) {
    scalar_t value = d[f];
    if (mean_part) value += mean_part[f] + square_part[f] * x[f];
    if (activation) value *= elu_grad(x[f]);
    d[f] = value;
  }
}

// With positional encoding, where every step has its own window [B, w, 2H]: d_window
// completed in place (complete_gradient_row) and added to the entries' d_kv (a
// [B, w, 2H] slice).
template <typename scalar_t>
void window_gradient(Tensor& d_window, const Tensor& window, const Tensor& mean_part,
                     const Tensor& square_part, bool activation, Tensor& d_kv) {
  const int64_t B = window.size(0), w = window.size(1), F = window.size(2);
  const int64_t x_b = window.stride(0), x_row = window.stride(1);
  const int64_t g_b = d_kv.stride(0), g_row = d_kv.stride(1);
  const scalar_t* x_all = window.data_ptr<scalar_t>();
  const scalar_t* mean_p = mean_part.defined() ? mean_part.data_ptr<scalar_t>() : nullptr;
  const scalar_t* square_p = mean_p ? square_part.data_ptr<scalar_t>() : nullptr;
  scalar_t* dw_all = d_window.data_ptr<scalar_t>();
  scalar_t* g_all = d_kv.data_ptr<scalar_t>();
  by_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < w; ++j) {
        scalar_t* __restrict__ dw = dw_all + (b * w + j) * F;
        scalar_t* __restrict__ g = g_all + b * g_b + j * g_row;
        complete_gradient_row(x_all + b * x_b + j * x_row, mean_p, square_p, activation, F, dw);
        for (int64_t f = 0; f < F; ++f) g[f] += dw[f];
      }
  });
}

// ---- The cell update (eqs. 6-8) ----
//
// Every BatchNorm normalises each feature over the batch: per feature, an affine map
// y = scale x + shift, and its backward another, dx = a dy + b + c x (from two sums
// over the batch). Each loop runs over the features of a row on __restrict__ pointers,
// so that g++ vectorises it.

template <typename scalar_t> inline scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + exp_clamped(-x));
}
template <typename scalar_t> inline scalar_t tanh_(scalar_t x) {
  return scalar_t(2) * sigmoid(scalar_t(2) * x) - scalar_t(1);
}
template <typename scalar_t> inline scalar_t elu(scalar_t x) {
  const scalar_t negative = exp_clamped(std::min(x, scalar_t(0))) - scalar_t(1);  // no branch
  return x > 0 ? x : negative;
}

// One BatchNorm at one step: gain and shift, the running statistics' row of this step,
// and the step's mean and 1/std (the batch's in training, the running ones in eval),
// which the forward writes and the backward reads. Feature k of the module is [k].
template <typename scalar_t>
struct StepNorm {
  const scalar_t *gamma, *beta;
  scalar_t *running_mean, *running_var, *mean, *invstd;

  // The statistics of F features (in training the batch's mean and variance, given,
  // and blended into the running ones as F.batch_norm does: unbiased variance,
  // momentum), then the affine map y = scale x + shift that normalises them.
  void forward(const scalar_t* batch_mean, const scalar_t* batch_var, int64_t B, int64_t F,
               bool training, double momentum, double eps, scalar_t* __restrict__ scale,
               scalar_t* __restrict__ shift) const {
    const scalar_t m = scalar_t(momentum);
    for (int64_t k = 0; k < F; ++k) {
      if (training) {
        mean[k] = batch_mean[k];
        invstd[k] = scalar_t(1) / std::sqrt(batch_var[k] + scalar_t(eps));
        running_mean[k] = (1 - m) * running_mean[k] + m * batch_mean[k];
        running_var[k] = (1 - m) * running_var[k] + m * batch_var[k] * B / (B - 1);
      } else {
        mean[k] = running_mean[k];
        invstd[k] = scalar_t(1) / std::sqrt(running_var[k] + scalar_t(eps));
      }
      scale[k] = gamma[k] * invstd[k];
      shift[k] = beta[k] - mean[k] * scale[k];
    }
  }

  // From the sums over the batch of dy and dy x of F features: adds the gain's and
  // shift's gradients, and gives dx = a dy + b + c x (in eval, where the statistics are
  // constants, b = c = 0).
  void backward(const scalar_t* __restrict__ sum_dy, const scalar_t* __restrict__ sum_dy_x,
                int64_t B, int64_t F, bool training, scalar_t* __restrict__ d_gamma,
                scalar_t* __restrict__ d_beta, scalar_t* __restrict__ a,
                scalar_t* __restrict__ b, scalar_t* __restrict__ c) const {
    for (int64_t k = 0; k < F; ++k) {
      const scalar_t sum_dy_xhat = (sum_dy_x[k] - mean[k] * sum_dy[k]) * invstd[k];
      d_gamma[k] += sum_dy_xhat, d_beta[k] += sum_dy[k];
      a[k] = gamma[k] * invstd[k];
      // dx = a (dy - mean(dy) - x_hat mean(dy x_hat)), x_hat = (x - mean) invstd
      c[k] = training ? -a[k] * invstd[k] * sum_dy_xhat / B : scalar_t(0);
      b[k] = training ? -a[k] * sum_dy[k] / B - c[k] * mean[k] : scalar_t(0);
    }
  }
};

// Scratch of a step's BatchNorms: one row of [F] per name, indexed by feature.
template <typename scalar_t>
struct Columns {
  std::vector<scalar_t> storage;
  int64_t F;
  Columns(int64_t rows, int64_t F) : storage(rows * F), F(F) {}
  scalar_t* operator[](int64_t row) { return storage.data() + row * F; }
};

// Rows [b0, b1) of x [B, F] (rows ld apart): their mean [F] and the sum of their squared
// deviations from it [F] (two passes: no cancellation).
template <typename scalar_t>
void block_moments(const scalar_t* __restrict__ x, int64_t ld, int64_t b0, int64_t b1,
                   int64_t F, scalar_t* __restrict__ mean, scalar_t* __restrict__ squares) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t k = 0; k < F; ++k) mean[k] += x[b * ld + k];
  for (int64_t k = 0; k < F; ++k) mean[k] /= b1 - b0;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t k = 0; k < F; ++k) {
      const scalar_t centred = x[b * ld + k] - mean[k];
      squares[k] += centred * centred;
    }
}

// Rows [b0, b1)'s sums of dy and dy x [F] added to sum_dy and sum_dy_x, rows dy_ld and
// x_ld apart.
template <typename scalar_t>
void batch_sums(const scalar_t* __restrict__ dy, int64_t dy_ld, const scalar_t* __restrict__ x,
                int64_t x_ld, int64_t b0, int64_t b1, int64_t F, scalar_t* __restrict__ sum_dy,
                scalar_t* __restrict__ sum_dy_x) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t k = 0; k < F; ++k) {
      sum_dy[k] += dy[b * dy_ld + k];
      sum_dy_x[k] += dy[b * dy_ld + k] * x[b * x_ld + k];
    }
}

// The mean and variance [F] of F features over `rows` rows of x (rows ld apart), on all
// threads: each block's mean and squared deviations (two passes: no cancellation), then
// Chan, Golub and LeVeque's pairwise update: the mean is the blocks' means weighted by
// their rows, the squared deviations the blocks' plus rows (block mean - mean)^2 per
// block. (mean(x^2) - mean(x)^2 cancels to a negative variance, and a NaN, where the mean
// is large against the spread.)
template <typename scalar_t>
void moments(const scalar_t* x, int64_t ld, int64_t rows, int64_t F, scalar_t* mean,
             scalar_t* var) {
  BlockSums<scalar_t> blocks(rows, 2 * F);
  blocks.run([&](int64_t r0, int64_t r1, scalar_t* sums) {
    block_moments(x, ld, r0, r1, F, sums, sums + F);
  });
  for (int64_t k = 0; k < F; ++k) {
    mean[k] = 0, var[k] = 0;
    for (int64_t i = 0; i < blocks.blocks; ++i) mean[k] += blocks.rows(i) * blocks[i][k];
    mean[k] /= rows;
    for (int64_t i = 0; i < blocks.blocks; ++i) {
      const scalar_t offset = blocks[i][k] - mean[k];
      var[k] += blocks[i][F + k] + blocks.rows(i) * offset * offset;
    }
    var[k] /= rows;
  }
}

// A BatchNorm at one step over all its F features, on all threads: its affine map
// (scale and shift [F]) from x [B, F] (rows ld apart), in training from the batch's
// moments.
template <typename scalar_t>
void norm_forward(const StepNorm<scalar_t>& norm, const scalar_t* x, int64_t ld, int64_t B,
                  int64_t F, bool training, double momentum, double eps, scalar_t* scale,
                  scalar_t* shift) {
  Columns<scalar_t> col(2, F);  // the batch's mean and variance
  if (training) moments(x, ld, B, F, col[0], col[1]);
  norm.forward(col[0], col[1], B, F, training, momentum, eps, scale, shift);
}

// Its backward, from dy and x [B, F] (rows dy_ld and x_ld apart): the gain's and shift's
// gradients added to d_gamma and d_beta, and dx = a dy + b + c x's a, b and c in rows
// 2-4 of col (rows 0-1: the sums over the batch).
template <typename scalar_t>
void norm_backward(const StepNorm<scalar_t>& norm, const scalar_t* dy, int64_t dy_ld,
                   const scalar_t* x, int64_t x_ld, int64_t B, int64_t F, bool training,
                   scalar_t* d_gamma, scalar_t* d_beta, Columns<scalar_t>& col) {
  BlockSums<scalar_t> blocks(B, 2 * F);
  blocks.run([&](int64_t b0, int64_t b1, scalar_t* sums) {
    batch_sums(dy, dy_ld, x, x_ld, b0, b1, F, sums, sums + F);
  });
  blocks.total(0, F, 1, col[0]);
  blocks.total(F, 2 * F, 1, col[1]);
  norm.backward(col[0], col[1], B, F, training, d_gamma, d_beta, col[2], col[3], col[4]);
}

// y = (scale x + shift) * mask, one row [F] (mask null: none).
template <typename scalar_t>
void affine_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale,
                const scalar_t* __restrict__ shift, const scalar_t* __restrict__ mask, int64_t F,
                scalar_t* __restrict__ y) {
  for (int64_t f = 0; f < F; ++f)
    y[f] = (scale[f] * x[f] + shift[f]) * (mask ? mask[f] : scalar_t(1));
}

// Eqs. 6-8 after the pre-activation z: BN_z, the gates, c and h, for one step.
// Row-major [B, F] arrays; z, gates and d_z hold the blocks g, f, i, o of 4H features.
template <typename scalar_t>
struct CellUpdate {
  int64_t B, H;
  bool training, recurrence;  // recurrence: BN_c inside the recurrence (eq. 8)
  double momentum, eps;
  StepNorm<scalar_t> gates_norm, cell_norm, hidden_norm;

  // z [B, 4H] holds the attention's share a W_a^T (or zeros); the input's x_gate (rows
  // x_ld apart) and its bias [4H] and h's h_gate (rows ld apart) are added to it first
  // (eq. 6's sum), in place.
  void forward(scalar_t* z, const scalar_t* x_gate, int64_t x_ld, const scalar_t* bias,
               const scalar_t* h_gate, int64_t ld,
               const scalar_t* c_prev, const scalar_t* mask, scalar_t* gates, scalar_t* c_raw,
               scalar_t* c_norm, scalar_t* c_next, scalar_t* u, scalar_t* h) const {
    const int64_t G = 4 * H;
    Columns<scalar_t> col(4, G);  // BN_z's affine map, then BN_c's or BN_h's
    scalar_t *z_scale = col[0], *z_shift = col[1], *scale = col[2], *shift = col[3];
    by_rows(B, [&](int64_t b0, int64_t b1) {                                    // (6)
      for (int64_t b = b0; b < b1; ++b)
        add_gate_inputs(z + b * G, x_gate + b * x_ld, bias, h_gate + b * ld, G);
    });
    norm_forward(gates_norm, z, G, B, G, training, momentum, eps, z_scale, z_shift);  // BN_z
    by_rows(B, [&](int64_t b0, int64_t b1) {                                    // (7-8)
      for (int64_t b = b0; b < b1; ++b)
        gates_row(z + b * G, z_scale, z_shift, c_prev + b * H, H, gates + b * G, c_raw + b * H);
    });
    norm_forward(cell_norm, c_raw, H, B, H, training, momentum, eps, scale, shift);  // BN_c
    by_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        cell_row(c_raw + b * H, scale, shift, gates + b * G + 3 * H, recurrence, H,
                 c_norm + b * H, u + b * H, c_next + b * H);
    });
    norm_forward(hidden_norm, u, H, B, H, training, momentum, eps, scale, shift);  // BN_h
    by_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        affine_row(u + b * H, scale, shift, mask ? mask + b * H : nullptr, H, h + b * H);
    });
  }

  // The backward of forward: from d_h and d_out (the gradients of h_s through the next
  // step and through the output, before dropout's mask) and d_c (the carried c_s's),
  // d_z [B, ld] (BN_z's input) and d_c_prev; d_hn and d_cn are scratch [B, H]. The
  // norms' gradients are added to d_gammas and d_betas (gates, cell, hidden).
  void backward(const scalar_t* d_h, const scalar_t* d_out, const scalar_t* mask,
                const scalar_t* d_c, const scalar_t* z, const scalar_t* gates,
                const scalar_t* c_prev,
                const scalar_t* c_raw, const scalar_t* c_norm, const scalar_t* u,
                scalar_t* const d_gammas[3], scalar_t* const d_betas[3], scalar_t* d_z,
                int64_t ld, scalar_t* d_c_prev, scalar_t* d_hn, scalar_t* d_cn) const {
    const int64_t G = 4 * H;
    Columns<scalar_t> col(5, G);  // see norm_backward: a BatchNorm's dx = a dy + b + c x
    const scalar_t *a = col[2], *b_ = col[3], *c = col[4];
    by_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        hidden_row_backward(d_h + b * H, d_out + b * H, mask ? mask + b * H : nullptr, H,
                            d_hn + b * H);
    });
    norm_backward(hidden_norm, d_hn, H, u, H, B, H, training, d_gammas[2], d_betas[2], col);
    by_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        cell_row_backward(d_hn + b * H, u + b * H, a, b_, c, gates + b * G + 3 * H,
                          c_norm + b * H, d_c + b * H, recurrence, H, d_z + b * ld + 3 * H,
                          d_cn + b * H);
    });
    norm_backward(cell_norm, d_cn, H, c_raw, H, B, H, training, d_gammas[1], d_betas[1], col);
    by_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        gates_row_backward(d_cn + b * H, c_raw + b * H, a, b_, c, d_c + b * H, recurrence,
                           gates + b * G, c_prev + b * H, H, d_z + b * ld, d_c_prev + b * H);
    });
    norm_backward(gates_norm, d_z, ld, z, G, B, G, training, d_gammas[0], d_betas[0], col);
    by_rows(B, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* __restrict__ dz = d_z + b * ld;
        const scalar_t* __restrict__ zb = z + b * G;
        for (int64_t y = 0; y < G; ++y) dz[y] = a[y] * dz[y] + b_[y] + c[y] * zb[y];
      }
    });
  }

 private:
  // One row each (the arguments are __restrict__ here, where g++ honours it).
  static void add_gate_inputs(scalar_t* __restrict__ z, const scalar_t* __restrict__ x_gate,
                              const scalar_t* __restrict__ bias,
                              const scalar_t* __restrict__ h_gate, int64_t G) {
    for (int64_t k = 0; k < G; ++k) z[k] += x_gate[k] + bias[k] + h_gate[k];
  }

  // Eq. 7's gates from z through BN_z, and eq. 8's c before BN_c.
  static void gates_row(const scalar_t* __restrict__ z, const scalar_t* __restrict__ z_scale,
                        const scalar_t* __restrict__ z_shift,
                        const scalar_t* __restrict__ c_prev, int64_t H,
                        scalar_t* __restrict__ gates, scalar_t* __restrict__ c_raw) {
    for (int64_t k = 0; k < H; ++k) {
      const int64_t kf = H + k, ki = 2 * H + k, ko = 3 * H + k;
      const scalar_t g = tanh_(z_scale[k] * z[k] + z_shift[k]);
      const scalar_t f = sigmoid(z_scale[kf] * z[kf] + z_shift[kf]);
      const scalar_t i = sigmoid(z_scale[ki] * z[ki] + z_shift[ki]);
      gates[k] = g, gates[kf] = f, gates[ki] = i;
      gates[ko] = sigmoid(z_scale[ko] * z[ko] + z_shift[ko]);
      c_raw[k] = g * i + c_prev[k] * f;
    }
  }

  // BN_c, u = o ELU(c_norm), and the carried c (BN_c's output or input, eq. 8).
  static void cell_row(const scalar_t* __restrict__ c_raw, const scalar_t* __restrict__ scale,
                       const scalar_t* __restrict__ shift, const scalar_t* __restrict__ o,
                       bool recurrence, int64_t H, scalar_t* __restrict__ c_norm,
                       scalar_t* __restrict__ u, scalar_t* __restrict__ c_next) {
    for (int64_t k = 0; k < H; ++k) {
      const scalar_t cn = scale[k] * c_raw[k] + shift[k];
      c_norm[k] = cn;
      u[k] = o[k] * elu(cn);
    }
    // a loop of its own: g++ does not vectorise the one above with this choice in it
    std::memcpy(c_next, recurrence ? c_norm : c_raw, H * sizeof(scalar_t));
  }

  static void hidden_row_backward(const scalar_t* __restrict__ d_h,
                                  const scalar_t* __restrict__ d_out,
                                  const scalar_t* __restrict__ mask, int64_t H,
                                  scalar_t* __restrict__ d_hn) {
    for (int64_t k = 0; k < H; ++k)
      d_hn[k] = mask ? (d_h[k] + d_out[k]) * mask[k] : d_h[k] + d_out[k];
  }

  // u = o ELU(c_norm): o's share (d_o, before BN_z) and c_norm's (d_cn, with the
  // carried c_s's gradient where BN_c is in the recurrence).
  static void cell_row_backward(const scalar_t* __restrict__ d_hn,
                                const scalar_t* __restrict__ u, const scalar_t* __restrict__ a,
                                const scalar_t* __restrict__ b_, const scalar_t* __restrict__ c,
                                const scalar_t* __restrict__ o,
                                const scalar_t* __restrict__ c_norm,
                                const scalar_t* __restrict__ d_c, bool recurrence, int64_t H,
                                scalar_t* __restrict__ d_o, scalar_t* __restrict__ d_cn) {
    // 1 where BN_c is in the recurrence; arithmetic rather than a branch in the loop
    const scalar_t in_recurrence = recurrence ? 1 : 0;
    for (int64_t k = 0; k < H; ++k) {
      const scalar_t d_u = a[k] * d_hn[k] + b_[k] + c[k] * u[k];
      const scalar_t cn = c_norm[k], e = elu(cn);
      d_o[k] = d_u * e * o[k] * (1 - o[k]);  // through the sigmoid, before BN_z
      const scalar_t d = d_u * o[k] * elu_grad(e);
      d_cn[k] = d + in_recurrence * d_c[k];  // the carried c_s is BN_c's output
    }
  }

  // c = g i + c_prev f: the gates' shares (d_gates' g, f, i blocks, before BN_z) and
  // c_prev's.
  static void gates_row_backward(const scalar_t* __restrict__ d_cn,
                                 const scalar_t* __restrict__ c_raw,
                                 const scalar_t* __restrict__ a, const scalar_t* __restrict__ b_,
                                 const scalar_t* __restrict__ c, const scalar_t* __restrict__ d_c,
                                 bool recurrence, const scalar_t* __restrict__ gates,
                                 const scalar_t* __restrict__ c_prev, int64_t H,
                                 scalar_t* __restrict__ d_gates,
                                 scalar_t* __restrict__ d_c_prev) {
    const scalar_t in_recurrence = recurrence ? 1 : 0;
    for (int64_t k = 0; k < H; ++k) {
      const scalar_t d = a[k] * d_cn[k] + b_[k] + c[k] * c_raw[k] +
                         (1 - in_recurrence) * d_c[k];  // or c_s is BN_c's input
      const scalar_t g = gates[k], f = gates[H + k], i = gates[2 * H + k];
      d_gates[k] = d * i * (1 - g * g);
      d_gates[H + k] = d * c_prev[k] * f * (1 - f);
      d_gates[2 * H + k] = d * g * i * (1 - i);
      d_c_prev[k] = d * f;
    }
  }
};

// x = ELU(x + bias), one row [F] in place.
template <typename scalar_t>
void elu_row(scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, int64_t F) {
  for (int64_t f = 0; f < F; ++f) x[f] = elu(x[f] + bias[f]);
}

// A BatchNorm's backward dx = a dy + b + c x, through the ELU whose output x is, one
// row [F].
template <typename scalar_t>
void norm_elu_backward_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                           const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                           const scalar_t* __restrict__ c, int64_t F, scalar_t* __restrict__ dx) {
  for (int64_t f = 0; f < F; ++f)
    dx[f] = (a[f] * dy[f] + b[f] + c[f] * x[f]) * elu_grad(x[f]);
}

// ---- The small per-step pieces around the attention, [B, F] each ----
//
// As in the cell update: passes by the threads' blocks of rows, sums over the batch one
// partial sum per block.

// Eq. 1 and the query as the scores use it, one row [H]: q = ELU(x_query + b_q + h_query)
// and qs = q * k_scale (BN_K's scale over sqrt(d); BN_K's shift only adds a constant per
// head, which softmax ignores).
template <typename scalar_t>
void query_row(const scalar_t* __restrict__ x_query, const scalar_t* __restrict__ b_q,
               const scalar_t* __restrict__ h_query, const scalar_t* __restrict__ k_scale,
               int64_t H, scalar_t* __restrict__ q, scalar_t* __restrict__ qs) {
  for (int64_t f = 0; f < H; ++f) {
    const scalar_t value = elu(x_query[f] + b_q[f] + h_query[f]);
    q[f] = value;
    qs[f] = value * k_scale[f];
  }
}

// One new window entry's keys and values, one sample's row kv [F] plus bias [F]:
// ELU'd where `activate`, stored in the entries at `entry`.
template <typename scalar_t>
void store_entry_row(const scalar_t* __restrict__ kv, const scalar_t* __restrict__ bias,
                     int64_t F, bool activate, scalar_t* __restrict__ entry) {
  for (int64_t f = 0; f < F; ++f) {
    const scalar_t value = kv[f] + bias[f];
    entry[f] = activate ? elu(value) : value;
  }
}

// Eq. 5: a = BN_a(ELU(x + bias)) [B, H] from x, W_o's output without its bias, which is
// made ELU(x + bias) in place.
template <typename scalar_t>
void elu_norm_forward(const StepNorm<scalar_t>& norm, const scalar_t* bias, scalar_t* x,
                      int64_t B, int64_t H, bool training, double momentum, double eps,
                      scalar_t* a) {
  by_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) elu_row(x + b * H, bias, H);
  });
  Columns<scalar_t> col(2, H);  // BN_a's affine map
  norm_forward(norm, x, H, B, H, training, momentum, eps, col[0], col[1]);
  by_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      affine_row<scalar_t>(x + b * H, col[0], col[1], nullptr, H, a + b * H);
  });
}

// The backward of elu_norm_forward: from da [B, H] and x = ELU(W_o's output), dx [B, H]
// (of W_o's output); adds BN_a's gain's and shift's gradients.
template <typename scalar_t>
void elu_norm_backward(const StepNorm<scalar_t>& norm, const scalar_t* da, const scalar_t* x,
                       int64_t B, int64_t H, bool training, scalar_t* d_gamma, scalar_t* d_beta,
                       scalar_t* dx) {
  Columns<scalar_t> col(5, H);  // see norm_backward
  norm_backward(norm, da, H, x, H, B, H, training, d_gamma, d_beta, col);
  by_rows(B, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      norm_elu_backward_row(da + b * H, x + b * H, col[2], col[3], col[4], H, dx + b * H);
  });
}

// The backward of query_row, one row [H]: from d_qs, the gradient of the query before
// its ELU, written to d_query, and d_qs q (k_scale's gradient, but for its factor
// 1 / sqrt(d)) added to d_k_scale.
template <typename scalar_t>
void query_backward_row(const scalar_t* __restrict__ d_qs, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k_scale, int64_t H,
                        scalar_t* __restrict__ d_query, scalar_t* __restrict__ d_k_scale) {
  for (int64_t f = 0; f < H; ++f) {
    d_query[f] = d_qs[f] * k_scale[f] * elu_grad(q[f]);
    d_k_scale[f] += d_qs[f] * q[f];
  }
}

// BN_V's read-out, read_bn = v_scale read + v_shift p_sum[h(f)], one row: the gradients
// of v_scale and v_shift [H] from d_read_bn [H], added to d_v_scale and d_v_shift.
template <typename scalar_t>
void read_norm_backward_row(const scalar_t* __restrict__ d_read_bn,
                            const scalar_t* __restrict__ read, const scalar_t* __restrict__ p_sum,
                            int64_t H, int64_t heads, scalar_t* __restrict__ d_v_scale,
                            scalar_t* __restrict__ d_v_shift) {
  for (int64_t f0 = 0; f0 < H; f0 += heads)  // f = f0 + h is in head h
    for (int64_t h = 0; h < heads; ++h) {
      d_v_scale[f0 + h] += d_read_bn[f0 + h] * read[f0 + h];
      d_v_shift[f0 + h] += d_read_bn[f0 + h] * p_sum[h];
    }
}

// The backward of LayerPass::window_norm at one step, from the gradients of scale and
// shift [F]: the gains' and shifts' gradients added to d_gamma and d_beta [F]; in
// training also mean_part and square_part [F], a window element x's share through the
// batch moments being mean_part + square_part x.
template <typename scalar_t>
void window_norm_backward(const scalar_t* d_scale, const scalar_t* d_shift,
                          const scalar_t* mean, const scalar_t* var, const scalar_t* gamma,
                          int64_t F, double eps, bool training, scalar_t count,
                          scalar_t* d_gamma, scalar_t* d_beta, scalar_t* mean_part,
                          scalar_t* square_part) {
  for (int64_t f = 0; f < F; ++f) {
    const scalar_t rstd = scalar_t(1) / std::sqrt(var[f] + scalar_t(eps));
    d_gamma[f] += (d_scale[f] - d_shift[f] * mean[f]) * rstd;
    d_beta[f] += d_shift[f];
    if (!training) continue;
    // scale = gamma rstd, shift = beta - mean scale; mean = sum(x) / count, mean_sq =
    // sum(x^2) / count, var = mean_sq - mean^2
    const scalar_t scale = gamma[f] * rstd;
    const scalar_t d_var =
        (d_scale[f] - mean[f] * d_shift[f]) * scalar_t(-0.5) * scale * rstd * rstd;
    const scalar_t d_mean = -d_shift[f] * scale - 2 * mean[f] * d_var;
    mean_part[f] = d_mean / count;
    square_part[f] = 2 * d_var / count;
  }
}

// Row i of x's first dimension: x[i].data_ptr(), without making the tensor x[i].
template <typename scalar_t>
scalar_t* row_ptr(const Tensor& x, int64_t i) {
  return x.data_ptr<scalar_t>() + i * x.stride(0);
}

Tensor undefined_if_empty(const Tensor& x) { return x.numel() ? x : Tensor(); }

// The large buffers of finished passes, reused by the next ones. Fresh memory costs a
// page fault per 4 KB when first written, and glibc maps every block over 32 MB afresh:
// at T = 512 that was a third of the step on our VMs, and made the step time grow
// faster than T. A pass gives its buffers back when it is destroyed (after its
// backward, see fused/__init__.py); a buffer is reused once nothing else holds it (a
// gradient the backward returned may still be in autograd's hands), by the smallest
// request it can hold with at most twice the room. The pool keeps at most as many
// bytes as the passes have ever held at once, so it never holds more than one step's
// worth; the oldest go first.
class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool;  // never destroyed: no tensor freed after torch at exit
    return *pool;
  }

  Tensor take(at::IntArrayRef shape, const at::TensorOptions& options) {
    std::lock_guard<std::mutex> lock(mutex_);
    reclaim();
    const int64_t numel = c10::multiply_integers(shape);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->scalar_type() == options.dtype() && it->numel() >= numel &&
          it->numel() <= 2 * numel && (best == free_.end() || it->numel() < best->numel()))
        best = it;
    Tensor buffer;
    if (best != free_.end()) {
      buffer = *best;
      free_bytes_ -= buffer.nbytes();
      free_.erase(best);
    } else {
      buffer = at::empty({numel}, options);
    }
    held_bytes_ += buffer.nbytes();
    peak_held_bytes_ = std::max(peak_held_bytes_, held_bytes_);
    return buffer.narrow(0, 0, numel).view(shape);
  }

  // Buffers from take(), back from a pass that no longer reads them.
  void give(std::vector<Tensor>& buffers) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Tensor& buffer : buffers) {
      held_bytes_ -= buffer.storage().nbytes();
      returned_.push_back(at::empty({0}, buffer.options()).set_(buffer.storage()));
    }
    buffers.clear();
  }

 private:
  // Returned buffers that nothing else holds any more become free; the oldest free
  // ones are dropped beyond the bound.
  void reclaim() {
    for (auto it = returned_.begin(); it != returned_.end();) {
      if (it->storage().use_count() == 1) {
        free_bytes_ += it->nbytes();
        free_.push_back(*it);
        it = returned_.erase(it);
      } else {
        ++it;
      }
    }
    while (free_bytes_ > peak_held_bytes_ && !free_.empty()) {
      free_bytes_ -= free_.front().nbytes();
      free_.erase(free_.begin());
    }
    if (returned_.size() > 256) returned_.erase(returned_.begin());  // kept by others
  }

  std::mutex mutex_;
  std::vector<Tensor> free_, returned_;
  int64_t free_bytes_ = 0, held_bytes_ = 0, peak_held_bytes_ = 0;
};

// One forward pass of one layer over a sequence, and afterwards its backward. It holds
// the parameters (as passed, already detached by autograd.Function), the running
// statistics (updated in place, as F.batch_norm does), and what the backward needs.
class LayerPass {
 public:
  LayerPass(std::vector<Tensor> weights, std::vector<Tensor> gammas, std::vector<Tensor> betas,
            std::vector<Tensor> running_means, std::vector<Tensor> running_vars,
            int64_t heads, int64_t window, int64_t start, bool attention, bool pe, bool activation,
            bool recurrence, bool training, double attention_dropout, double momentum,
            double eps, int64_t seed)
      : gammas_(std::move(gammas)), betas_(std::move(betas)),
        running_means_(std::move(running_means)), running_vars_(std::move(running_vars)),
        heads_(heads), window_(window), start_(start), attention_(attention), pe_(pe),
        activation_(activation), recurrence_(recurrence), training_(training),
        attention_dropout_(attention_dropout), momentum_(momentum), eps_(eps),
        seed_(static_cast<uint64_t>(seed)) {
    TORCH_CHECK(weights.size() == 7 && gammas_.size() == NORMS && betas_.size() == NORMS);
    W_hidden_ = weights[0];  // [W_qh; W_h] (or W_h alone): one product of h_{t-1}
    W_a_ = weights[1];
    W_kv_ = weights[2];      // [W_k,c; W_v,c]: the projection of a cell value
    b_kv_ = weights[3];
    pe_kv_ = weights[4];     // [k, 2H]: the pe terms of keys and values, distances k..1
    W_o_ = weights[5];
    b_o_ = weights[6];
    if (attention_ && activation_) {
      gamma_kv_ = at::cat({gammas_[KEYS], gammas_[VALUES]});
      beta_kv_ = at::cat({betas_[KEYS], betas_[VALUES]});
    }
  }

  ~LayerPass() { Pool::instance().give(taken_); }

  // inputs [T, B, I] and their weights W_in = [W_q,x; W_x] [H + 4H, I] and biases
  // b_in = [b_q; b] (W_x and b alone without attention), the state (h0, c0, cells0
  // [w0, B, H]) and the hidden dropout mask [T, B, H] (empty without dropout). Returns
  // outputs [T, B, H], h, c and the window's cells.
  std::vector<Tensor> forward(const Tensor& inputs, const Tensor& W_in, const Tensor& b_in,
                              const Tensor& h0, const Tensor& c0, const Tensor& cells0,
                              const Tensor& hidden_mask, bool keep_for_backward) {
    T_ = inputs.size(0), B_ = inputs.size(1), H_ = h0.size(1);
    const int64_t G = 4 * H_;
    inputs_ = inputs, W_in_ = W_in, b_in_ = b_in, hidden_mask_ = undefined_if_empty(hidden_mask);
    keep_ = keep_for_backward;
    auto options = inputs.options();
    // The inputs' share of every step, [T, B, H + 4H] ([x_query | x_gate]), in one
    // product into a buffer of the pool (a fresh output of this size is faulted in page
    // by page); the biases are added where the shares are read.
    x_in_ = take({T_, B_, W_in.size(0)}, options);
    Tensor x_in_rows = x_in_.view({T_ * B_, W_in.size(0)});
    at::mm_out(x_in_rows, inputs.reshape({T_ * B_, inputs.size(2)}), W_in.t());
    // What only the backward reads is kept per step; without a backward, one step's
    // worth is reused (at row(s), which is then 0).
    const int64_t kept = keep_ ? T_ : 1;
    h_seq_ = take({T_ + 1, B_, H_}, options);
    c_seq_ = take({T_ + 1, B_, H_}, options);
    h_seq_[0].copy_(h0);
    c_seq_[0].copy_(c0);
    z_pre_ = take({kept, B_, G}, options);
    gates_ = take({kept, B_, G}, options);
    c_raw_ = take({kept, B_, H_}, options);
    c_norm_ = take({kept, B_, H_}, options);
    u_ = take({kept, B_, H_}, options);
    for (int n = ATTENTION; n < NORMS; ++n) {
      const int64_t features = n == GATES ? G : H_;
      save_mean_[n] = take({T_, features}, options);
      save_invstd_[n] = take({T_, features}, options);
    }
    if (attention_) {
      cells0_ = cells0;
      w0_ = cells0.size(0);
      n_ = w0_ + T_;
      kv_ = take({B_, n_, 2 * H_}, options);
      q_ = take({kept, B_, H_}, options);
      read_ = take({kept, B_, H_}, options);
      p_sum_ = take({kept, B_, heads_}, options);
      read_bn_ = take({kept, B_, H_}, options);
      a_act_ = take({kept, B_, H_}, options);
      a_ = take({kept, B_, H_}, options);
      qs_ = take({kept, B_, H_}, options);
      if (activation_) {
        entry_mean_ = take({n_, 2 * H_}, options);
        entry_var_ = take({n_, 2 * H_}, options);
        window_mean_ = take({T_, 2 * H_}, options);
        window_var_ = take({T_, 2 * H_}, options);
        window_scale_ = take({T_, 2 * H_}, options);
        window_shift_ = take({T_, 2 * H_}, options);
      }
      drop_ = Dropout(seed_, training_ ? attention_dropout_ : 0.0, window_, B_, heads_);
      p_.resize(T_);
    }
    for (int64_t s = 0; s < T_; ++s) forward_step(s);
    Tensor cells;
    if (attention_) {
      const int64_t wf = std::min(window_, n_);
      std::vector<Tensor> last;
      for (int64_t e = n_ - wf; e < n_; ++e) last.push_back(entry(e));
      cells = at::stack(last);
    } else {
      cells = c_seq_[T_].unsqueeze(0).clone();  // a BN-LSTM's state holds c alone
    }
    return {h_seq_.slice(0, 1).clone(), h_seq_[T_].clone(), c_seq_[T_].clone(), cells};
  }

  // Gradients of outputs, h, c and cells (zeros where unused). Returns the
  // gradients of inputs, W_in, b_in, h0, c0, cells0, the seven weights, then the six
  // BatchNorm gains and the six shifts.
  std::vector<Tensor> backward(const Tensor& d_outputs, const Tensor& d_h_last,
                               const Tensor& d_c_last, const Tensor& d_cells_last) {
    TORCH_CHECK(keep_, "this LARNN pass was run without keeping what its backward needs");
    d_outputs_ = d_outputs;
    const int64_t G = 4 * H_, Hq = attention_ ? H_ : 0;
    auto options = h_seq_.options();
    d_hz_ = take({T_, B_, Hq + G}, options);
    d_cell_scratch_ = take({2, B_, H_}, options);
    for (int n = 0; n < NORMS; ++n) {
      if (gammas_[n].numel()) {
        d_gammas_[n] = at::zeros_like(gammas_[n]);
        d_betas_[n] = at::zeros_like(betas_[n]);
      }
    }
    Tensor d_h = d_h_last.clone(), d_c = d_c_last.clone();
    if (attention_) {
      d_a_pre_ = take({T_, B_, H_}, options);
      d_kv_ = take({B_, n_, 2 * H_}, options).zero_();
      d_entries_ = take({n_, B_, H_}, options).zero_();  // from the final window
      if (pe_) d_pe_kv_ = at::zeros_like(pe_kv_);
      if (activation_) {  // BN_K's and BN_V's gains and shifts, keys then values
        d_gamma_kv_ = at::zeros({2 * H_}, options);
        d_beta_kv_ = at::zeros({2 * H_}, options);
      }
      if (activation_ && !pe_ && training_) {  // see finish_entries
        entry_mean_part_ = at::zeros({n_, 2 * H_}, options);
        entry_square_part_ = at::zeros({n_, 2 * H_}, options);
      }
      d_entries_.slice(0, n_ - d_cells_last.size(0)).add_(d_cells_last);
    } else {
      d_c.add_(d_cells_last[0]);
    }
    for (int64_t s = T_ - 1; s >= 0; --s) d_c = backward_step(s, d_h, d_c);

    // d_hz_ [T, B, H + 4H] is also the gradient of the inputs' share x_in_.
    std::vector<Tensor> grads(13 + 2 * NORMS);
    Tensor d_z_pre = d_hz_.narrow(2, Hq, G), d_x_in = d_hz_.view({T_ * B_, Hq + G});
    const int64_t I = inputs_.size(2);
    grads[0] = at::mm(d_x_in, W_in_).view({T_, B_, I});                  // inputs
    grads[1] = at::mm(d_x_in.t(), inputs_.reshape({T_ * B_, I}));         // W_in
    grads[2] = d_hz_.sum({0, 1});                                          // b_in
    grads[3] = d_h;
    grads[4] = d_c;
    grads[6] = at::mm(d_x_in.t(), h_seq_.slice(0, 0, T_).reshape({T_ * B_, H_}));  // W_hidden
    if (attention_) {
      // The initial window's entries: the final window's share plus their projections'.
      finish_entries(0, w0_);
      Tensor d_kv0 = d_kv_.slice(1, 0, w0_).transpose(0, 1);
      grads[5] = d_entries_.slice(0, 0, w0_) + at::matmul(d_kv0, W_kv_);
      grads[7] = at::mm(d_z_pre.reshape({T_ * B_, G}).t(), a_.reshape({T_ * B_, H_}));
      Tensor entries = at::cat({cells0_, c_seq_.slice(0, 1)}).transpose(0, 1);  // [B, n, H]
      grads[8] = at::mm(d_kv_.reshape({B_ * n_, 2 * H_}).t(), entries.reshape({B_ * n_, H_}));
      grads[9] = d_kv_.sum({0, 1});
      if (pe_) grads[10] = d_pe_kv_;
      grads[11] = at::mm(d_a_pre_.reshape({T_ * B_, H_}).t(), read_bn_.reshape({T_ * B_, H_}));
      grads[12] = d_a_pre_.sum({0, 1});
    }
    if (attention_ && activation_) {
      d_gammas_[KEYS].add_(d_gamma_kv_.narrow(0, 0, H_));
      d_gammas_[VALUES].add_(d_gamma_kv_.narrow(0, H_, H_));
      d_betas_[VALUES].add_(d_beta_kv_.narrow(0, H_, H_));
    }
    for (int n = 0; n < NORMS; ++n) {
      grads[13 + n] = d_gammas_[n];
      grads[13 + NORMS + n] = d_betas_[n];
    }
    grads[13 + NORMS + KEYS] = Tensor();  // BN_K's shift adds a constant per head: no effect
    return grads;
  }

 private:
  // ---- forward ----

  void forward_step(int64_t s) {
    const int64_t t = start_ + s, Hq = attention_ ? H_ : 0;
    Tensor hz = at::mm(h_seq_[s], W_hidden_.t());  // [h_query | h_gate] or h_gate
    Tensor z = z_pre_[row(s)];
    if (attention_)
      at::mm_out(z, attend(s, t, hz.narrow(1, 0, H_)), W_a_.t());            // (1-5)
    else
      z.zero_();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cell_forward", [&] {         // (6-8)
      cell_update<scalar_t>(s, t).forward(
          z.data_ptr<scalar_t>(), row_ptr<scalar_t>(x_in_, s) + Hq, x_in_.stride(1),
          b_in_.data_ptr<scalar_t>() + Hq, hz.data_ptr<scalar_t>() + Hq, hz.stride(0),
          row_ptr<scalar_t>(c_seq_, s),
          hidden_mask_.defined() ? row_ptr<scalar_t>(hidden_mask_, s) : nullptr,
          row_ptr<scalar_t>(gates_, row(s)), row_ptr<scalar_t>(c_raw_, row(s)),
          row_ptr<scalar_t>(c_norm_, row(s)), row_ptr<scalar_t>(c_seq_, s + 1),
          row_ptr<scalar_t>(u_, row(s)), row_ptr<scalar_t>(h_seq_, s + 1));
    });
  }

  // A buffer of this pass, from the pool, given back when the pass is destroyed.
  Tensor take(at::IntArrayRef shape, const at::TensorOptions& options) {
    taken_.push_back(Pool::instance().take(shape, options));
    return taken_.back();
  }

  // The row of step s in the buffers that only the backward reads (see forward).
  int64_t row(int64_t s) const { return keep_ ? s : 0; }

  template <typename scalar_t>
  StepNorm<scalar_t> step_norm(int n, int64_t s, int64_t t) const {
    return {gammas_[n].data_ptr<scalar_t>(), betas_[n].data_ptr<scalar_t>(),
            running_row<scalar_t>(running_means_[n], t),
            running_row<scalar_t>(running_vars_[n], t),
            row_ptr<scalar_t>(save_mean_[n], s), row_ptr<scalar_t>(save_invstd_[n], s)};
  }

  template <typename scalar_t>
  CellUpdate<scalar_t> cell_update(int64_t s, int64_t t) const {
    return {B_, H_, training_, recurrence_, momentum_, eps_, step_norm<scalar_t>(GATES, s, t),
            step_norm<scalar_t>(CELL, s, t), step_norm<scalar_t>(HIDDEN, s, t)};
  }

  Tensor attend(int64_t s, int64_t t, const Tensor& h_query) {
    project_entries(s);
    Tensor window = window_at(s);                                              // (2-3)
    const int64_t w = window.size(1);
    Tensor p = at::empty({B_, w, heads_}, h_query.options());
    const int64_t r = row(s);
    Tensor read = read_[r], p_sum = p_sum_[r], read_bn = read_bn_[r], a_act = a_act_[r];
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "attention", [&] {
      window_norm<scalar_t>(s, t, window);
      const scalar_t* scale = activation_ ? row_ptr<scalar_t>(window_scale_, s) : nullptr;
      const scalar_t* shift = activation_ ? row_ptr<scalar_t>(window_shift_, s) : nullptr;
      const std::vector<scalar_t> k_scale = query_scale<scalar_t>(s);
      const scalar_t* x_query = row_ptr<scalar_t>(x_in_, s);
      scalar_t* q = row_ptr<scalar_t>(q_, r);
      scalar_t* qs = row_ptr<scalar_t>(qs_, r);
      by_rows(B_, [&](int64_t b0, int64_t b1) {                                 // (1)
        for (int64_t b = b0; b < b1; ++b)
          query_row(x_query + b * x_in_.stride(1), b_in_.data_ptr<scalar_t>(),
                    h_query.data_ptr<scalar_t>() + b * h_query.stride(0), k_scale.data(), H_,
                    q + b * H_, qs + b * H_);
      });
      Attention(window, heads_).forward<scalar_t>(                           // (4)
          row_ptr<scalar_t>(qs_, r), window.data_ptr<scalar_t>(),
          scale ? scale + H_ : nullptr, shift ? shift + H_ : nullptr, drop_, s,
          p.data_ptr<scalar_t>(), p_sum.data_ptr<scalar_t>(), read.data_ptr<scalar_t>(),
          read_bn.data_ptr<scalar_t>());
      at::mm_out(a_act, read_bn, W_o_.t());
      const StepNorm<scalar_t> norm = step_norm<scalar_t>(ATTENTION, s, t);    // (5)
      elu_norm_forward<scalar_t>(norm, b_o_.data_ptr<scalar_t>(), a_act.data_ptr<scalar_t>(),
                                 B_, H_, training_, momentum_, eps_, row_ptr<scalar_t>(a_, r));
    });
    if (keep_) p_[s] = p;
    return a_[r];
  }

  // The scores' scale, 1 / sqrt(d) for d = H / heads features per head.
  template <typename scalar_t>
  scalar_t inv_sqrt_d() const { return scalar_t(1) / std::sqrt(scalar_t(H_ / heads_)); }

  // The query's factor in the scores [H]: BN_K's scale at step s (1 without BN_K) over
  // sqrt(d).
  template <typename scalar_t>
  std::vector<scalar_t> query_scale(int64_t s) const {
    std::vector<scalar_t> k_scale(H_, inv_sqrt_d<scalar_t>());
    if (activation_)
      for (int64_t f = 0; f < H_; ++f) k_scale[f] *= row_ptr<scalar_t>(window_scale_, s)[f];
    return k_scale;
  }

  // The cell value at entry e: the initial window's, then c_t pushed by step e - w0.
  Tensor entry(int64_t e) const { return e < w0_ ? cells0_[e] : c_seq_[e - w0_ + 1]; }

  // Projects the entries that enter the window before step s reads it: the initial
  // window at s = 0, then c_{s-1}. Without pe, the activation and BN moments are
  // taken here too, once per entry.
  void project_entries(int64_t s) {
    const int64_t lo = s == 0 ? 0 : w0_ + s - 1, hi = w0_ + s;
    Tensor cells = s == 0 ? cells0_ : c_seq_[s].unsqueeze(0);
    Tensor kv = at::mm(cells.reshape({-1, H_}), W_kv_.t()).view({hi - lo, B_, 2 * H_});
    const bool on_entry = activation_ && !pe_;
    AT_DISPATCH_FLOATING_TYPES(kv.scalar_type(), "store_entries", [&] {
      const int64_t F = 2 * H_;
      for (int64_t e = lo; e < hi; ++e) {
        const scalar_t* kv_e = row_ptr<scalar_t>(kv, e - lo);
        scalar_t* entries = kv_.data_ptr<scalar_t>() + e * kv_.stride(1);
        by_rows(B_, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            store_entry_row(kv_e + b * F, b_kv_.data_ptr<scalar_t>(), F, on_entry,
                            entries + b * kv_.stride(0));
        });
        if (on_entry && training_)  // only training's BN_K and BN_V read them
          moments<scalar_t>(entries, kv_.stride(0), B_, F, row_ptr<scalar_t>(entry_mean_, e),
                            row_ptr<scalar_t>(entry_var_, e));
      }
    });
  }

  // Step s's window [B, w, 2H], oldest first, as the attention reads it: a slice of the
  // entries, or with pe f(entry + pe term of its distance), built in a scratch buffer
  // that every step reuses (a new tensor per step left the allocator holding ~1 GB more
  // at the costliest corner).
  Tensor window_at(int64_t s) {
    const int64_t hi = w0_ + s, lo = std::max<int64_t>(0, hi - window_), w = hi - lo;
    Tensor window = kv_.slice(1, lo, hi);
    if (!pe_) return window;
    Tensor built = scratch(window_scratch_, w);
    at::add_out(built, window, pe_kv_.slice(0, window_ - w));  // short: the nearest distances
    return activation_ ? at::elu_(built) : built;
  }

  // A contiguous [B, w, 2H] view of a scratch buffer with room for a whole window.
  Tensor scratch(Tensor& buffer, int64_t w) {
    if (!buffer.defined()) buffer = take({B_ * window_ * 2 * H_}, kv_.options());
    return buffer.narrow(0, 0, B_ * w * 2 * H_).view({B_, w, 2 * H_});
  }

  // BN_K and BN_V at step s as per-feature affine maps, y = scale x + shift, written to
  // window_scale_[s] and window_shift_[s] [2H] (keys, then values). In training from the
  // window's moments over batch x entries (saved in window_mean_ and window_var_, and
  // blended into the running statistics as F.batch_norm does: unbiased variance,
  // momentum); in eval from the running statistics.
  template <typename scalar_t>
  void window_norm(int64_t s, int64_t t, const Tensor& window) {
    if (!activation_) return;
    const int64_t F = 2 * H_, w = window.size(1), hi = w0_ + s;
    scalar_t* mean = row_ptr<scalar_t>(window_mean_, s);
    scalar_t* var = row_ptr<scalar_t>(window_var_, s);
    scalar_t* running_mean[2] = {running_row<scalar_t>(running_means_[KEYS], t),
                                 running_row<scalar_t>(running_means_[VALUES], t)};
    scalar_t* running_var[2] = {running_row<scalar_t>(running_vars_[KEYS], t),
                                running_row<scalar_t>(running_vars_[VALUES], t)};
    if (training_) {
      if (pe_) {  // each step's window is its own: its moments over batch x entries
        moments<scalar_t>(window.data_ptr<scalar_t>(), F, B_ * w, F, mean, var);
      } else {  // from the entries' moments, taken once per entry over the same B rows:
        // the mean of their means, and of their variances plus (entry mean - mean)^2
        const scalar_t* entry_mean = entry_mean_.data_ptr<scalar_t>();
        const scalar_t* entry_var = entry_var_.data_ptr<scalar_t>();
        for (int64_t f = 0; f < F; ++f) mean[f] = 0, var[f] = 0;
        for (int64_t e = hi - w; e < hi; ++e)
          for (int64_t f = 0; f < F; ++f) mean[f] += entry_mean[e * F + f];
        for (int64_t f = 0; f < F; ++f) mean[f] /= w;
        for (int64_t e = hi - w; e < hi; ++e)
          for (int64_t f = 0; f < F; ++f) {
            const scalar_t offset = entry_mean[e * F + f] - mean[f];
            var[f] += entry_var[e * F + f] + offset * offset;
          }
        for (int64_t f = 0; f < F; ++f) var[f] /= w;
      }
      const scalar_t m = scalar_t(momentum_), count = scalar_t(w * B_);
      for (int64_t f = 0; f < F; ++f) {
        const int64_t n = f < H_ ? 0 : 1, k = f < H_ ? f : f - H_;
        running_mean[n][k] = (1 - m) * running_mean[n][k] + m * mean[f];
        running_var[n][k] = (1 - m) * running_var[n][k] + m * var[f] * count / (count - 1);
      }
    } else {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t n = f < H_ ? 0 : 1, k = f < H_ ? f : f - H_;
        mean[f] = running_mean[n][k], var[f] = running_var[n][k];
      }
    }
    const scalar_t* gamma = gamma_kv_.data_ptr<scalar_t>();
    const scalar_t* beta = beta_kv_.data_ptr<scalar_t>();
    scalar_t* scale = row_ptr<scalar_t>(window_scale_, s);
    scalar_t* shift = row_ptr<scalar_t>(window_shift_, s);
    for (int64_t f = 0; f < F; ++f) {
      scale[f] = gamma[f] / std::sqrt(var[f] + scalar_t(eps_));
      shift[f] = beta[f] - mean[f] * scale[f];
    }
  }

  // The running statistics' row of step t (the last row for later steps).
  template <typename scalar_t>
  scalar_t* running_row(const Tensor& running, int64_t t) const {
    return row_ptr<scalar_t>(running, std::min(t, running.size(0) - 1));
  }

  // ---- backward ----

  // Step s's backward, given the gradients of its outputs h_s (d_h, updated in place
  // to h_{s-1}'s) and of the cell value it carried on (d_c); returns c_{s-1}'s.
  Tensor backward_step(int64_t s, Tensor& d_h, Tensor d_c) {
    const int64_t t = start_ + s, G = 4 * H_, Hq = attention_ ? H_ : 0;
    if (attention_) {  // c_s is also window entry w0 + s: its reads' share
      const int64_t e = w0_ + s;
      d_c.add_(d_entries_[e]);
      if (s < T_ - 1) {  // the last entry is in no window of this pass
        finish_entries(e, e + 1);
        d_c.addmm_(d_kv_.select(1, e), W_kv_);
      }
    }
    Tensor d_c_prev = at::empty_like(d_c);
    AT_DISPATCH_FLOATING_TYPES(d_h.scalar_type(), "cell_backward", [&] {
      scalar_t* d_gammas[3] = {d_gammas_[GATES].data_ptr<scalar_t>(),
                               d_gammas_[CELL].data_ptr<scalar_t>(),
                               d_gammas_[HIDDEN].data_ptr<scalar_t>()};
      scalar_t* d_betas[3] = {d_betas_[GATES].data_ptr<scalar_t>(),
                              d_betas_[CELL].data_ptr<scalar_t>(),
                              d_betas_[HIDDEN].data_ptr<scalar_t>()};
      cell_update<scalar_t>(s, t).backward(
          d_h.data_ptr<scalar_t>(), row_ptr<scalar_t>(d_outputs_, s),
          hidden_mask_.defined() ? row_ptr<scalar_t>(hidden_mask_, s) : nullptr,
          d_c.data_ptr<scalar_t>(), row_ptr<scalar_t>(z_pre_, s),
          row_ptr<scalar_t>(gates_, s), row_ptr<scalar_t>(c_seq_, s),
          row_ptr<scalar_t>(c_raw_, s), row_ptr<scalar_t>(c_norm_, s),
          row_ptr<scalar_t>(u_, s), d_gammas, d_betas, row_ptr<scalar_t>(d_hz_, s) + Hq,
          Hq + G, d_c_prev.data_ptr<scalar_t>(), row_ptr<scalar_t>(d_cell_scratch_, 0),
          row_ptr<scalar_t>(d_cell_scratch_, 1));
    });
    Tensor d_z_pre = d_hz_[s].narrow(1, Hq, G);
    if (attention_) {
      Tensor d_a = at::mm(d_z_pre, W_a_), d_a_pre = d_a_pre_[s];
      AT_DISPATCH_FLOATING_TYPES(d_a.scalar_type(), "attention_norm_backward", [&] {
        const StepNorm<scalar_t> norm = step_norm<scalar_t>(ATTENTION, s, t);
        elu_norm_backward<scalar_t>(norm, d_a.data_ptr<scalar_t>(), row_ptr<scalar_t>(a_act_, s),
                                    B_, H_, training_, d_gammas_[ATTENTION].data_ptr<scalar_t>(),
                                    d_betas_[ATTENTION].data_ptr<scalar_t>(),
                                    d_a_pre.data_ptr<scalar_t>());
      });
      attend_backward(s, t, at::mm(d_a_pre, W_o_));
    }
    d_h = at::mm(d_hz_[s], W_hidden_);
    return d_c_prev;
  }

  // Eqs. 3-4 backward from the gradient of BN_V's read-out: adds the window's share to
  // the entries' gradients (d_kv_, and with pe d_pe_kv_), and BN_K's and BN_V's gains
  // and shift; returns the gradient of q.
  // Without pe, an entry's keys and values x are the same in every window that holds
  // it, so the parts of its gradient that depend on x alone are applied once, when all
  // its reads are done (entries lo .. hi): the BN moments' share, summed over its
  // windows (mean_part + square_part * x), then ELU'(x) = 1 for x > 0, else x + 1.
  void finish_entries(int64_t lo, int64_t hi) {
    if (pe_ || !activation_) return;
    AT_DISPATCH_FLOATING_TYPES(kv_.scalar_type(), "finish_entries", [&] {
      const int64_t F = 2 * H_;
      const scalar_t* mean_part = training_ ? row_ptr<scalar_t>(entry_mean_part_, 0) : nullptr;
      const scalar_t* square_part = training_ ? row_ptr<scalar_t>(entry_square_part_, 0) : nullptr;
      const scalar_t* x = kv_.data_ptr<scalar_t>();
      scalar_t* d = d_kv_.data_ptr<scalar_t>();
      by_rows(B_, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t e = lo; e < hi; ++e)
            complete_gradient_row(x + (b * n_ + e) * F, mean_part ? mean_part + e * F : nullptr,
                                  square_part ? square_part + e * F : nullptr, true, F,
                                  d + (b * n_ + e) * F);
      });
    });
  }

  // Eqs. 1-4 backward from the gradient of BN_V's read-out: the query's gradient (before
  // its ELU) written to d_hz_[s], the window's share added to the entries' gradients
  // (d_kv_, and with pe d_pe_kv_), and BN_K's and BN_V's gains' and shift's.
  void attend_backward(int64_t s, int64_t t, const Tensor& d_read_bn) {
    Tensor window = window_at(s);
    const int64_t w = window.size(1), hi = w0_ + s, F = 2 * H_;
    // Without pe the window is a slice of the entries, and the attention adds its
    // gradient straight to theirs (ELU' and BN's share wait for finish_entries); with
    // pe, to this step's window first.
    Tensor d_window = pe_ ? scratch(d_window_scratch_, w).zero_() : d_kv_.slice(1, hi - w, hi);
    Tensor d_qs = at::empty({B_, H_}, d_read_bn.options());
    // the gradients of BN_K's and BN_V's scale and shift, then mean_part and square_part
    Tensor affine = at::zeros({4, F}, d_read_bn.options());
    AT_DISPATCH_FLOATING_TYPES(d_read_bn.scalar_type(), "attention_backward", [&] {
      const scalar_t* scale = activation_ ? row_ptr<scalar_t>(window_scale_, s) : nullptr;
      const scalar_t* shift = activation_ ? row_ptr<scalar_t>(window_shift_, s) : nullptr;
      Attention(window, heads_).backward<scalar_t>(
          p_[s].data_ptr<scalar_t>(), row_ptr<scalar_t>(qs_, s), window.data_ptr<scalar_t>(),
          scale ? scale + H_ : nullptr, shift ? shift + H_ : nullptr, drop_, s,
          d_read_bn.data_ptr<scalar_t>(), d_qs.data_ptr<scalar_t>(),
          d_window.data_ptr<scalar_t>(), d_window.stride(0), d_window.stride(1));
      scalar_t* d_scale = row_ptr<scalar_t>(affine, 0);
      scalar_t* d_shift = row_ptr<scalar_t>(affine, 1);
      // the query's gradient; sums of BN_K's scale's, BN_V's scale's and shift's [3, H]
      const std::vector<scalar_t> k_scale = query_scale<scalar_t>(s);
      const scalar_t *q = row_ptr<scalar_t>(q_, s), *read = row_ptr<scalar_t>(read_, s);
      const scalar_t* p_sum = row_ptr<scalar_t>(p_sum_, s);
      scalar_t* d_query = row_ptr<scalar_t>(d_hz_, s);
      const int64_t ld = d_hz_.stride(1);
      BlockSums<scalar_t> sums(B_, 3 * H_);
      sums.run([&](int64_t b0, int64_t b1, scalar_t* d_norms) {
        for (int64_t b = b0; b < b1; ++b) {
          query_backward_row(d_qs.data_ptr<scalar_t>() + b * H_, q + b * H_, k_scale.data(), H_,
                             d_query + b * ld, d_norms);
          if (activation_)
            read_norm_backward_row(d_read_bn.data_ptr<scalar_t>() + b * H_, read + b * H_,
                                   p_sum + b * heads_, H_, heads_, d_norms + H_,
                                   d_norms + 2 * H_);
        }
      });
      if (!activation_) return;
      sums.total(0, H_, inv_sqrt_d<scalar_t>(), d_scale);
      sums.total(H_, 2 * H_, 1, d_scale + H_);
      sums.total(2 * H_, 3 * H_, 1, d_shift + H_);
      window_norm_backward<scalar_t>(
          d_scale, d_shift, row_ptr<scalar_t>(window_mean_, s),
          row_ptr<scalar_t>(window_var_, s), gamma_kv_.data_ptr<scalar_t>(), F, eps_,
          training_, scalar_t(w * B_), d_gamma_kv_.data_ptr<scalar_t>(),
          d_beta_kv_.data_ptr<scalar_t>(), row_ptr<scalar_t>(affine, 2),
          row_ptr<scalar_t>(affine, 3));
    });
    Tensor mean_part = training_ && activation_ ? affine[2] : Tensor();
    Tensor square_part = training_ && activation_ ? affine[3] : Tensor();
    if (!pe_) {
      if (mean_part.defined()) {
        entry_mean_part_.slice(0, hi - w, hi).add_(mean_part);
        entry_square_part_.slice(0, hi - w, hi).add_(square_part);
      }
      return;
    }
    Tensor d_entries = d_kv_.slice(1, hi - w, hi);
    AT_DISPATCH_FLOATING_TYPES(d_read_bn.scalar_type(), "window_gradient", [&] {
      window_gradient<scalar_t>(d_window, window, mean_part, square_part, activation_, d_entries);
    });
    d_pe_kv_.slice(0, window_ - w).add_(d_window.sum(0));
  }

  std::vector<Tensor> gammas_, betas_, running_means_, running_vars_;
  Tensor W_hidden_, W_a_, W_kv_, b_kv_, pe_kv_, W_o_, b_o_, gamma_kv_, beta_kv_;
  int64_t heads_, window_, start_;
  bool attention_, pe_, activation_, recurrence_, training_;
  double attention_dropout_, momentum_, eps_;
  uint64_t seed_;
  bool keep_ = false;
  int64_t T_ = 0, B_ = 0, H_ = 0, w0_ = 0, n_ = 0;
  Dropout drop_;
  // forward: inputs, the sequences of h and c (index s holds the value before step s),
  // and per step the tensors the backward reads
  Tensor inputs_, W_in_, b_in_, x_in_, hidden_mask_, cells0_, h_seq_, c_seq_;
  Tensor z_pre_, gates_, c_raw_, c_norm_, u_;
  Tensor kv_, entry_mean_, entry_var_, window_mean_, window_var_, window_scale_,
      window_shift_, qs_;
  Tensor q_, read_, p_sum_, read_bn_, a_act_, a_;
  std::vector<Tensor> p_;  // softmax(scores) per step, [B, w, heads]
  Tensor save_mean_[NORMS], save_invstd_[NORMS];
  // backward
  Tensor d_outputs_, d_hz_, d_a_pre_, d_kv_, d_entries_, d_pe_kv_;
  Tensor entry_mean_part_, entry_square_part_;  // [n, 2H], see finish_entries
  Tensor d_gamma_kv_, d_beta_kv_;  // [2H]: BN_K's and BN_V's
  Tensor window_scratch_, d_window_scratch_;  // with pe, see window_at
  Tensor d_cell_scratch_;  // [2, B, H], see CellUpdate::backward
  Tensor d_gammas_[NORMS], d_betas_[NORMS];
  std::vector<Tensor> taken_;  // see take
};

// The attention dropout masks a pass with this seed applies, [T, k, B, heads] (slot j
// of step s's window at [s, j]), for tests that replay them in the reference.
Tensor attention_dropout_masks(int64_t seed, double p, int64_t steps, int64_t window,
                               int64_t batch, int64_t heads) {
  Dropout drop(static_cast<uint64_t>(seed), p, window, batch, heads);
  Tensor masks = at::empty({steps, batch, window, heads}, at::kDouble);
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t b = 0; b < batch; ++b) drop.fill(s, b, window, masks[s][b].data_ptr<double>());
  return masks.transpose(1, 2);
}

// Fills mask (contiguous) with a dropout mask of rate p: element i (in memory order;
// i modulo 2^32, which only tensors of over 4 billion elements reach) as Dropout draws it.
void fill_dropout_mask(Tensor& mask, int64_t seed, double p) {
  TORCH_CHECK(mask.is_contiguous());
  const Dropout drop(static_cast<uint64_t>(seed), p, 1, 1, 1);
  AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "dropout_mask", [&] {
    scalar_t* out = mask.data_ptr<scalar_t>();
    at::parallel_for(0, mask.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
      drop.fill_from(uint32_t(i0), i1 - i0, out + i0);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LayerPass>(m, "LayerPass")
      .def(pybind11::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                          std::vector<Tensor>, std::vector<Tensor>, int64_t, int64_t, int64_t,
                          bool, bool, bool, bool, bool, double, double, double, int64_t>())
      .def("forward", &LayerPass::forward)
      .def("backward", &LayerPass::backward);
  m.def("attention_dropout_masks", &attention_dropout_masks);
  m.def("fill_dropout_mask", &fill_dropout_mask);
}
