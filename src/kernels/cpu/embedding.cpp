#include "kernels/cpu/embedding.h"

#include <algorithm>

#include "core/error.h"

namespace nextron::cpu {

namespace {

void check_ids(const int64_t* ids, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n)
    NEXTRON_CHECK(ids[n] >= 0 && ids[n] < V, "embedding: token id ", ids[n], " at position ", n,
                  " is outside the vocabulary [0, ", V, "); the tokenizer or data does not match vocab_size ", V);
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const T* table, const int64_t* ids, int64_t N, int64_t H, const VocabShard& vocab) {
  check_ids(ids, N, vocab.full);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    if (vocab.holds(ids[n]))
      std::copy_n(table + (ids[n] - vocab.begin) * H, H, out + n * H);
    else
      std::fill_n(out + n * H, H, T(0));
  }
}

template <typename T>
void embedding_backward(T* dtable, const T* dout, const int64_t* ids, int64_t N, int64_t H, const VocabShard& vocab) {
  check_ids(ids, N, vocab.full);
  // Threads own disjoint column blocks of the table, so repeated ids never race and the sum order is fixed.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (H + kBlock - 1) / kBlock;
#pragma omp parallel for
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t h0 = b * kBlock, h1 = std::min(H, h0 + kBlock);
    for (int64_t n = 0; n < N; ++n) {
      if (!vocab.holds(ids[n])) continue;
      T* dst = dtable + (ids[n] - vocab.begin) * H;
      const T* src = dout + n * H;
      for (int64_t h = h0; h < h1; ++h) dst[h] += src[h];
    }
  }
}

template void embedding_forward<float>(float*, const float*, const int64_t*, int64_t, int64_t, const VocabShard&);
template void embedding_forward<double>(double*, const double*, const int64_t*, int64_t, int64_t, const VocabShard&);
template void embedding_backward<float>(float*, const float*, const int64_t*, int64_t, int64_t, const VocabShard&);
template void embedding_backward<double>(double*, const double*, const int64_t*, int64_t, int64_t, const VocabShard&);

}  // namespace nextron::cpu
