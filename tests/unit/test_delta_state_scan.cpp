// The delta rule over a sequence split into slices (context parallelism's state passing, cpu/delta_state_scan.h)
// against the whole sequence, in double precision: outputs and every gradient, for splits at arbitrary points,
// mid-chunk and uneven ones included.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gradcheck.h"
#include "kernels/cpu/delta_state_scan.h"

namespace nextron::test {
namespace {

using cpu::GdrShape;
using Vec = std::vector<double>;

// Tokens [a, a + len) of every sequence of x, laid out (B, S, width).
Vec take(const Vec& x, int64_t B, int64_t S, int64_t width, int64_t a, int64_t len) {
  Vec out(static_cast<size_t>(B * len * width));
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(x.begin() + (b * S + a) * width, len * width, out.begin() + b * len * width);
  return out;
}

// x[tokens a, a + len) of every sequence = part.
void put(Vec& x, const Vec& part, int64_t B, int64_t S, int64_t width, int64_t a, int64_t len) {
  for (int64_t b = 0; b < B; ++b)
    std::copy_n(part.begin() + b * len * width, len * width, x.begin() + (b * S + a) * width);
}

double max_abs(const Vec& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::abs(v));
  return m;
}

void expect_close(const Vec& got, const Vec& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double err = 0;
  for (size_t i = 0; i < got.size(); ++i) err = std::max(err, std::abs(got[i] - want[i]));
  EXPECT_LE(err, 1e-11 * std::max(1.0, max_abs(want))) << what;
}

struct Inputs {
  Vec q, k, v, g, beta, d_o;
};

Inputs make_inputs(const GdrShape& s, uint64_t seed) {
  Inputs in{randn(s.B * s.S * s.Hk * s.dk, seed),     randn(s.B * s.S * s.Hk * s.dk, seed + 1),
            randn(s.B * s.S * s.Hv * s.dv, seed + 2), randn(s.B * s.S * s.Hv, seed + 3),
            randn(s.B * s.S * s.Hv, seed + 4),        randn(s.B * s.S * s.Hv * s.dv, seed + 5)};
  for (Vec* x : {&in.q, &in.k})  // L2-normalised rows, as the model passes them
    for (size_t row = 0; row < x->size(); row += static_cast<size_t>(s.dk)) {
      double n2 = 0;
      for (int64_t i = 0; i < s.dk; ++i) n2 += (*x)[row + i] * (*x)[row + i];
      for (int64_t i = 0; i < s.dk; ++i) (*x)[row + i] /= std::sqrt(n2 + 1e-6);
    }
  for (double& g : in.g) g = -std::log1p(std::exp(g));  // log-decays <= 0
  for (double& b : in.beta) b = 1.0 / (1.0 + std::exp(-b));
  return in;
}

// Splits the sequence at `lengths` and runs the state-passing forward and backward; compares with the whole sequence.
void check_split(const GdrShape& s, const std::vector<int64_t>& lengths, uint64_t seed) {
  ASSERT_EQ(std::accumulate(lengths.begin(), lengths.end(), int64_t{0}), s.S);
  const Inputs in = make_inputs(s, seed);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.dk));
  const size_t qk = static_cast<size_t>(s.B * s.S * s.Hk * s.dk), vo = static_cast<size_t>(s.B * s.S * s.Hv * s.dv),
               gb = static_cast<size_t>(s.B * s.S * s.Hv);

  // The whole sequence, by the recurrent reference.
  Vec o(vo), dq(qk, 0), dk(qk, 0), dv(vo, 0), dg(gb, 0), dbeta(gb, 0);
  cpu::gated_delta_rule_recurrent_forward<double>(o.data(), nullptr, in.q.data(), in.k.data(), in.v.data(), in.g.data(),
                                                  in.beta.data(), nullptr, s, scale);
  cpu::gated_delta_rule_recurrent_backward<double>(dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data(), nullptr,
                                                   in.d_o.data(), nullptr, in.q.data(), in.k.data(), in.v.data(),
                                                   in.g.data(), in.beta.data(), nullptr, s, scale);

  // The slices: (M_c, L_c) from each alone, the prefix, the exact forward from S_in_c.
  const auto n = static_cast<int64_t>(lengths.size());
  const int64_t mb = s.B * s.Hv * s.dk * s.dk, sb = s.B * s.Hv * s.dk * s.dv;
  Vec m(static_cast<size_t>(n * mb)), local(static_cast<size_t>(n * sb)), states(static_cast<size_t>(n * sb));
  struct Slice {
    GdrShape s;
    int64_t at;
    Vec q, k, v, g, beta, d_o;
  };
  std::vector<Slice> slices;
  int64_t at = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t len = lengths[static_cast<size_t>(c)];
    Slice sl{GdrShape{s.B, len, s.Hk, s.Hv, s.dk, s.dv}, at,
             take(in.q, s.B, s.S, s.Hk * s.dk, at, len), take(in.k, s.B, s.S, s.Hk * s.dk, at, len),
             take(in.v, s.B, s.S, s.Hv * s.dv, at, len), take(in.g, s.B, s.S, s.Hv, at, len),
             take(in.beta, s.B, s.S, s.Hv, at, len),     take(in.d_o, s.B, s.S, s.Hv * s.dv, at, len)};
    Vec o_local(static_cast<size_t>(s.B * len * s.Hv * s.dv));
    cpu::gated_delta_rule_chunked_forward<double>(o_local.data(), local.data() + c * sb, sl.q.data(), sl.k.data(),
                                                  sl.v.data(), sl.g.data(), sl.beta.data(), nullptr, sl.s, scale);
    cpu::slice_transition<double>(m.data() + c * mb, sl.k.data(), sl.g.data(), sl.beta.data(), sl.s);
    slices.push_back(std::move(sl));
    at += len;
  }
  cpu::prefix_states<double>(states.data(), m.data(), local.data(), n, s.B, s.Hv, s.dk, s.dv);
  Vec o_split(vo);
  for (int64_t c = 0; c < n; ++c) {
    const Slice& sl = slices[static_cast<size_t>(c)];
    Vec oc(sl.v.size());
    cpu::gated_delta_rule_chunked_forward<double>(oc.data(), nullptr, sl.q.data(), sl.k.data(), sl.v.data(),
                                                  sl.g.data(), sl.beta.data(), states.data() + c * sb, sl.s, scale);
    put(o_split, oc, s.B, s.S, s.Hv * s.dv, sl.at, sl.s.S);
  }
  expect_close(o_split, o, "outputs");

  // Backward: each slice's local dS_in, the suffix, the exact backward with the final-state gradient.
  Vec local_in_grads(static_cast<size_t>(n * sb), 0), final_grads(static_cast<size_t>(n * sb));
  for (int64_t c = 0; c < n; ++c) {
    const Slice& sl = slices[static_cast<size_t>(c)];
    Vec tq(sl.q.size(), 0), tk(sl.k.size(), 0), tv(sl.v.size(), 0), tg(sl.g.size(), 0), tb(sl.beta.size(), 0);
    cpu::gated_delta_rule_chunked_backward<double>(
        tq.data(), tk.data(), tv.data(), tg.data(), tb.data(), local_in_grads.data() + c * sb, sl.d_o.data(), nullptr,
        sl.q.data(), sl.k.data(), sl.v.data(), sl.g.data(), sl.beta.data(), states.data() + c * sb, sl.s, scale);
  }
  cpu::suffix_final_grads<double>(final_grads.data(), m.data(), local_in_grads.data(), n, s.B, s.Hv, s.dk, s.dv);
  Vec sdq(qk), sdk(qk), sdv(vo), sdg(gb), sdb(gb);
  for (int64_t c = 0; c < n; ++c) {
    const Slice& sl = slices[static_cast<size_t>(c)];
    Vec tq(sl.q.size(), 0), tk(sl.k.size(), 0), tv(sl.v.size(), 0), tg(sl.g.size(), 0), tb(sl.beta.size(), 0);
    cpu::gated_delta_rule_chunked_backward<double>(
        tq.data(), tk.data(), tv.data(), tg.data(), tb.data(), nullptr, sl.d_o.data(), final_grads.data() + c * sb,
        sl.q.data(), sl.k.data(), sl.v.data(), sl.g.data(), sl.beta.data(), states.data() + c * sb, sl.s, scale);
    put(sdq, tq, s.B, s.S, s.Hk * s.dk, sl.at, sl.s.S);
    put(sdk, tk, s.B, s.S, s.Hk * s.dk, sl.at, sl.s.S);
    put(sdv, tv, s.B, s.S, s.Hv * s.dv, sl.at, sl.s.S);
    put(sdg, tg, s.B, s.S, s.Hv, sl.at, sl.s.S);
    put(sdb, tb, s.B, s.S, s.Hv, sl.at, sl.s.S);
  }
  expect_close(sdq, dq, "dq");
  expect_close(sdk, dk, "dk");
  expect_close(sdv, dv, "dv");
  expect_close(sdg, dg, "dg");
  expect_close(sdb, dbeta, "dbeta");
}

TEST(DeltaStateScan, TransitionMapsAnyIncomingState) {
  // M X + L equals the slice's final state from X, for a random X: the recurrence is affine in its state.
  const GdrShape s{2, 77, 2, 4, 8, 6};
  const Inputs in = make_inputs(s, 11);
  const int64_t mb = s.B * s.Hv * s.dk * s.dk, sb = s.B * s.Hv * s.dk * s.dv;
  Vec m(static_cast<size_t>(mb)), local(static_cast<size_t>(sb)), from_x(static_cast<size_t>(sb)), o(in.d_o.size());
  const Vec x = randn(sb, 99);
  cpu::slice_transition<double>(m.data(), in.k.data(), in.g.data(), in.beta.data(), s, 16);
  cpu::gated_delta_rule_recurrent_forward<double>(o.data(), local.data(), in.q.data(), in.k.data(), in.v.data(),
                                                  in.g.data(), in.beta.data(), nullptr, s, 0.5);
  cpu::gated_delta_rule_recurrent_forward<double>(o.data(), from_x.data(), in.q.data(), in.k.data(), in.v.data(),
                                                  in.g.data(), in.beta.data(), x.data(), s, 0.5);
  // prefix_states over three slices whose first ends in X (its transition is never used) and whose second is this
  // one: the third slice's incoming state is M X + L.
  Vec m3(static_cast<size_t>(3 * mb), 0), l3(static_cast<size_t>(3 * sb), 0), three(static_cast<size_t>(3 * sb));
  std::copy(m.begin(), m.end(), m3.begin() + mb);
  std::copy(x.begin(), x.end(), l3.begin());
  std::copy(local.begin(), local.end(), l3.begin() + sb);
  cpu::prefix_states<double>(three.data(), m3.data(), l3.data(), 3, s.B, s.Hv, s.dk, s.dv);
  expect_close(Vec(three.begin() + 2 * sb, three.end()), from_x, "M X + L");
}

TEST(DeltaStateScan, SplitSequenceEqualsWholeSequence) {
  const GdrShape s{2, 150, 2, 4, 8, 6};
  check_split(s, {150}, 1);             // one slice: the plain kernel
  check_split(s, {64, 86}, 2);          // at a chunk boundary
  check_split(s, {37, 50, 63}, 3);      // mid-chunk, uneven
  check_split(s, {1, 148, 1}, 4);       // one-token slices
  check_split(s, {19, 19, 19, 93}, 5);  // four ranks, odd lengths
}

TEST(DeltaStateScan, SplitWithEqualHeadsAndLongSlices) {
  check_split(GdrShape{1, 300, 3, 3, 16, 16}, {129, 171}, 6);  // Hk == Hv, slices longer than two chunks
}

}  // namespace
}  // namespace nextron::test
