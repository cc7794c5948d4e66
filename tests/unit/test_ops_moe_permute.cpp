// The expert-parallel dispatcher's token movement (kernels/cpu/moe_permute.h): permute and unpermute against
// explicit loops, and their gradients (of the rows, the weights and x) against finite differences in double, on
// random slot orders where a token's K slots land anywhere among the rows.
#include <algorithm>
#include <numeric>
#include <random>

#include "gradcheck.h"
#include "kernels/cpu/moe_permute.h"

namespace nextron::test {

namespace {

// A random bijection of the N K slots onto rows; row_token[r] is the token of the slot at row r.
void random_slots(int64_t N, int64_t K, uint64_t seed, std::vector<int32_t>& slot_row,
                  std::vector<int32_t>& row_token) {
  std::vector<int32_t> rows(N * K);
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), std::mt19937_64(seed));
  slot_row = rows;
  row_token.assign(N * K, -1);
  for (int64_t s = 0; s < N * K; ++s) row_token[slot_row[s]] = static_cast<int32_t>(s / K);
}

}  // namespace

TEST(MoePermute, ForwardMatchesLoops) {
  const int64_t N = 5, K = 3, H = 4;
  std::vector<int32_t> slot_row, row_token;
  random_slots(N, K, 3, slot_row, row_token);
  const auto x = randn(N * H, 1), w = randn(N * K, 2), rows_in = randn(N * K * H, 4);
  std::vector<double> rows(N * K * H), y(N * H, 7.0);
  cpu::moe_permute<double>(rows.data(), x.data(), row_token.data(), N * K, H);
  cpu::moe_unpermute<double>(y.data(), rows_in.data(), w.data(), slot_row.data(), N, K, H);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t h = 0; h < H; ++h) EXPECT_EQ(rows[slot_row[n * K + k] * H + h], x[n * H + h]);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      double want = 0;
      for (int64_t k = 0; k < K; ++k) want += w[n * K + k] * rows_in[slot_row[n * K + k] * H + h];
      EXPECT_NEAR(y[n * H + h], want, 1e-12);
    }
}

TEST(MoePermute, GradientsMatchFiniteDifferences) {
  const int64_t N = 4, K = 2, H = 3;
  std::vector<int32_t> slot_row, row_token;
  random_slots(N, K, 9, slot_row, row_token);
  const auto x0 = randn(N * H, 5), w0 = randn(N * K, 6), g = randn(N * H, 7), gr = randn(N * K * H, 8);
  // Loss of unpermute(permute-independent rows, w): sum g . y; and of permute: sum gr . rows.
  const auto rows0 = randn(N * K * H, 10);
  auto unpermute_loss = [&](const std::vector<double>& rows, const std::vector<double>& w) {
    std::vector<double> y(N * H);
    cpu::moe_unpermute<double>(y.data(), rows.data(), w.data(), slot_row.data(), N, K, H);
    return std::inner_product(y.begin(), y.end(), g.begin(), 0.0);
  };
  std::vector<double> drows(N * K * H, 0.0), dw(N * K, 0.5);  // dw accumulates onto 0.5
  cpu::moe_unpermute_backward<double>(drows.data(), dw.data(), g.data(), rows0.data(), w0.data(), slot_row.data(), N, K,
                                      H);
  for (double& v : dw) v -= 0.5;
  expect_gradient([&](const std::vector<double>& r) { return unpermute_loss(r, w0); }, rows0, drows, "d rows");
  expect_gradient([&](const std::vector<double>& w) { return unpermute_loss(rows0, w); }, w0, dw, "d weights");

  auto permute_loss = [&](const std::vector<double>& x) {
    std::vector<double> rows(N * K * H);
    cpu::moe_permute<double>(rows.data(), x.data(), row_token.data(), N * K, H);
    return std::inner_product(rows.begin(), rows.end(), gr.begin(), 0.0);
  };
  std::vector<double> dx(N * H, 0.25);  // accumulates
  cpu::moe_permute_backward<double>(dx.data(), gr.data(), slot_row.data(), N, K, H);
  for (double& v : dx) v -= 0.25;
  expect_gradient(permute_loss, x0, dx, "d x");
}

}  // namespace nextron::test
