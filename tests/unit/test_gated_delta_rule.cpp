#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "gradcheck.h"
#include "kernels/cpu/gated_delta_rule.h"
#include "kernels/cpu_ops.h"

namespace nextron::test {
namespace {

using cpu::GdrShape;

// Inputs as the model produces them: q, k L2-normalised per (token, key head), beta = sigmoid(randn),
// g = -exp(A_h) * softplus(randn) per value head, clamped to [g_min, 0).
struct GdrInputs {
  GdrShape s;
  std::vector<double> q, k, v, g, beta, init;
};

GdrInputs make_inputs(const GdrShape& s, uint64_t seed, double g_min = -5.0) {
  GdrInputs in{s,
               randn(s.B * s.S * s.Hk * s.dk, seed),
               randn(s.B * s.S * s.Hk * s.dk, seed + 1),
               randn(s.B * s.S * s.Hv * s.dv, seed + 2),
               randn(s.B * s.S * s.Hv, seed + 3),
               randn(s.B * s.S * s.Hv, seed + 4),
               randn(s.B * s.Hv * s.dk * s.dv, seed + 5, 0.5)};
  for (auto* x : {&in.q, &in.k})
    for (size_t row = 0; row < x->size(); row += s.dk) {
      double n2 = 0;
      for (int64_t i = 0; i < s.dk; ++i) n2 += (*x)[row + i] * (*x)[row + i];
      for (int64_t i = 0; i < s.dk; ++i) (*x)[row + i] /= std::sqrt(n2 + 1e-6);
    }
  const auto a = randn(s.Hv, seed + 6, 0.5);  // A_log per value head: exp(A) around 1
  for (size_t e = 0; e < in.g.size(); ++e) {
    const double softplus = std::log1p(std::exp(in.g[e]));
    in.g[e] = std::max(g_min, -std::exp(a[e % s.Hv]) * softplus);
  }
  for (auto& b : in.beta) b = 1.0 / (1.0 + std::exp(-b));
  return in;
}

double scale_of(const GdrShape& s) { return 1.0 / std::sqrt(static_cast<double>(s.dk)); }

// Outputs and gradients of one implementation, converted to double for comparison.
struct GdrResult {
  std::vector<double> o, fin, dq, dk, dv, dg, dbeta, dinit;
};

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return {x.begin(), x.end()};
}

// Runs forward and backward in precision T; chunk <= 0 selects the recurrent form.
template <typename T>
GdrResult run(const GdrInputs& in, const std::vector<double>& d_o, const std::vector<double>& d_fin, int64_t chunk) {
  const GdrShape& s = in.s;
  const auto q = cast<T>(in.q), k = cast<T>(in.k), v = cast<T>(in.v), g = cast<T>(in.g), beta = cast<T>(in.beta),
             init = cast<T>(in.init), dO = cast<T>(d_o), dF = cast<T>(d_fin);
  std::vector<T> o(v.size()), fin(init.size()), dq(q.size()), dk(k.size()), dv(v.size()), dg(g.size()),
      dbeta(beta.size()), dinit(init.size());
  const T sc = static_cast<T>(scale_of(s));
  if (chunk > 0) {
    cpu::gated_delta_rule_chunked_forward<T>(o.data(), fin.data(), q.data(), k.data(), v.data(), g.data(), beta.data(),
                                             init.data(), s, sc, chunk);
    cpu::gated_delta_rule_chunked_backward<T>(dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data(), dinit.data(),
                                              dO.data(), dF.data(), q.data(), k.data(), v.data(), g.data(), beta.data(),
                                              init.data(), s, sc, chunk);
  } else {
    cpu::gated_delta_rule_recurrent_forward<T>(o.data(), fin.data(), q.data(), k.data(), v.data(), g.data(),
                                               beta.data(), init.data(), s, sc);
    cpu::gated_delta_rule_recurrent_backward<T>(dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data(), dinit.data(),
                                                dO.data(), dF.data(), q.data(), k.data(), v.data(), g.data(),
                                                beta.data(), init.data(), s, sc);
  }
  auto d = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  return {d(o), d(fin), d(dq), d(dk), d(dv), d(dg), d(dbeta), d(dinit)};
}

// max |a - ref| <= tol * max(max |ref|, 1e-3): an error bound relative to the tensor's own scale.
void expect_close(const std::vector<double>& a, const std::vector<double>& ref, double tol, const std::string& what) {
  ASSERT_EQ(a.size(), ref.size()) << what;
  double err = 0, mag = 1e-3;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a[i])) << what << " element " << i;
    err = std::max(err, std::abs(a[i] - ref[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  EXPECT_LE(err, tol * mag) << what << ": max abs error " << err << " vs max |ref| " << mag;
}

void expect_all_close(const GdrResult& a, const GdrResult& ref, double tol, const std::string& what) {
  expect_close(a.o, ref.o, tol, what + " o");
  expect_close(a.fin, ref.fin, tol, what + " final_state");
  expect_close(a.dq, ref.dq, tol, what + " dq");
  expect_close(a.dk, ref.dk, tol, what + " dk");
  expect_close(a.dv, ref.dv, tol, what + " dv");
  expect_close(a.dg, ref.dg, tol, what + " dg");
  expect_close(a.dbeta, ref.dbeta, tol, what + " dbeta");
  expect_close(a.dinit, ref.dinit, tol, what + " d_initial_state");
}

// Finite-difference check of every input gradient of loss = <o, r_o> + <final_state, r_f> (double precision).
void check_gradients_fd(const GdrShape& s, int64_t chunk, uint64_t seed) {
  const GdrInputs in = make_inputs(s, seed);
  const auto r_o = randn(in.v.size(), seed + 10), r_f = randn(in.init.size(), seed + 11);
  const GdrResult res = run<double>(in, r_o, r_f, chunk);
  auto loss = [&](const GdrInputs& x) {
    std::vector<double> o(x.v.size()), fin(x.init.size());
    if (chunk > 0)
      cpu::gated_delta_rule_chunked_forward(o.data(), fin.data(), x.q.data(), x.k.data(), x.v.data(), x.g.data(),
                                            x.beta.data(), x.init.data(), s, scale_of(s), chunk);
    else
      cpu::gated_delta_rule_recurrent_forward(o.data(), fin.data(), x.q.data(), x.k.data(), x.v.data(), x.g.data(),
                                              x.beta.data(), x.init.data(), s, scale_of(s));
    return dot(o, r_o) + dot(fin, r_f);
  };
  auto wrt = [&](std::vector<double> GdrInputs::*field) {
    return [&, field](const std::vector<double>& val) {
      GdrInputs x = in;
      x.*field = val;
      return loss(x);
    };
  };
  expect_gradient(wrt(&GdrInputs::q), in.q, res.dq, "dq");
  expect_gradient(wrt(&GdrInputs::k), in.k, res.dk, "dk");
  expect_gradient(wrt(&GdrInputs::v), in.v, res.dv, "dv");
  expect_gradient(wrt(&GdrInputs::g), in.g, res.dg, "dg");
  expect_gradient(wrt(&GdrInputs::beta), in.beta, res.dbeta, "dbeta");
  expect_gradient(wrt(&GdrInputs::init), in.init, res.dinit, "d_initial_state");
}

}  // namespace

// The recurrence as written in the model description, for one head over two tokens:
// S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t).
TEST(GatedDeltaRule, RecurrentForwardMatchesClosedForm) {
  const GdrShape s{1, 2, 1, 1, 3, 2};
  const GdrInputs in = make_inputs(s, 7);
  const double sc = scale_of(s);
  std::vector<double> o(s.S * s.dv), fin(s.dk * s.dv);
  cpu::gated_delta_rule_recurrent_forward(o.data(), fin.data(), in.q.data(), in.k.data(), in.v.data(), in.g.data(),
                                          in.beta.data(), in.init.data(), s, sc);
  std::vector<double> St = in.init;
  for (int64_t t = 0; t < s.S; ++t) {
    const double* kt = &in.k[t * s.dk];
    const double* vt = &in.v[t * s.dv];
    const double a = std::exp(in.g[t]), b = in.beta[t];
    std::vector<double> next(St.size());
    for (int64_t i = 0; i < s.dk; ++i)
      for (int64_t j = 0; j < s.dv; ++j) {
        double proj = St[i * s.dv + j];  // ((I - b k k^T) S)_ij
        for (int64_t l = 0; l < s.dk; ++l) proj -= b * kt[i] * kt[l] * St[l * s.dv + j];
        next[i * s.dv + j] = a * proj + b * kt[i] * vt[j];
      }
    St = next;
    for (int64_t j = 0; j < s.dv; ++j) {
      double ref = 0;
      for (int64_t i = 0; i < s.dk; ++i) ref += sc * in.q[t * s.dk + i] * St[i * s.dv + j];
      EXPECT_NEAR(o[t * s.dv + j], ref, 1e-13);
    }
  }
  for (size_t e = 0; e < St.size(); ++e) EXPECT_NEAR(fin[e], St[e], 1e-13);
}

TEST(GatedDeltaRule, RecurrentBackwardMatchesFiniteDifferences) {
  check_gradients_fd(GdrShape{2, 5, 1, 2, 3, 4}, /*chunk=*/0, 100);
  // More tokens than one backward checkpoint segment (64), two key heads.
  check_gradients_fd(GdrShape{1, 70, 2, 2, 2, 2}, /*chunk=*/0, 200);
}

TEST(GatedDeltaRule, ChunkedBackwardMatchesFiniteDifferences) {
  // Chunks of 4 over 10 tokens: two full chunks and a partial one.
  check_gradients_fd(GdrShape{2, 10, 1, 2, 3, 4}, /*chunk=*/4, 300);
}

// Chunked and recurrent forms agree in double to rounding, for every output and gradient.
TEST(GatedDeltaRule, ChunkedMatchesRecurrentDouble) {
  struct Case {
    int64_t S, chunk;
  };
  for (const Case c : {Case{1, 64}, Case{63, 64}, Case{64, 64}, Case{65, 64}, Case{200, 64}, Case{13, 4}}) {
    const GdrShape s{2, c.S, 2, 4, 16, 12};
    const GdrInputs in = make_inputs(s, 1000 + c.S);
    const auto d_o = randn(in.v.size(), 2000 + c.S), d_f = randn(in.init.size(), 3000 + c.S);
    const GdrResult ref = run<double>(in, d_o, d_f, 0);
    expect_all_close(run<double>(in, d_o, d_f, c.chunk), ref, 1e-10,
                     "S=" + std::to_string(c.S) + " chunk=" + std::to_string(c.chunk));
  }
}

// Generation's decoding step (CpuOps::gated_delta_rule_step): the recurrence over one token, the cached state passed
// as both the initial and the final state, run token by token from the prompt's state, gives the chunked forward's
// outputs and final state over the same tokens (double: agreement to rounding, 1e-10 of each tensor's scale).
TEST(GatedDeltaRule, DecodeStepsEqualChunkedForwardDouble) {
  const GdrShape s{2, 150, 2, 4, 16, 12};  // 150 tokens: two whole chunks of 64 and a partial one
  const GdrInputs in = make_inputs(s, 4242);
  std::vector<double> o_ref(in.v.size()), final_ref(in.init.size());
  cpu::gated_delta_rule_chunked_forward<double>(o_ref.data(), final_ref.data(), in.q.data(), in.k.data(), in.v.data(),
                                                in.g.data(), in.beta.data(), in.init.data(), s, 0.25);
  std::vector<double> state = in.init, o(in.v.size());
  const GdrShape one{s.B, 1, s.Hk, s.Hv, s.dk, s.dv};
  const int64_t nqk = s.Hk * s.dk, nv = s.Hv * s.dv, ng = s.Hv;
  std::vector<double> q(s.B * nqk), k(s.B * nqk), v(s.B * nv), g(s.B * ng), beta(s.B * ng), ot(s.B * nv);
  for (int64_t t = 0; t < s.S; ++t) {
    // Token t of every sequence, as (B, 1, ...) rows.
    for (int64_t b = 0; b < s.B; ++b) {
      std::copy_n(in.q.begin() + (b * s.S + t) * nqk, nqk, q.begin() + b * nqk);
      std::copy_n(in.k.begin() + (b * s.S + t) * nqk, nqk, k.begin() + b * nqk);
      std::copy_n(in.v.begin() + (b * s.S + t) * nv, nv, v.begin() + b * nv);
      std::copy_n(in.g.begin() + (b * s.S + t) * ng, ng, g.begin() + b * ng);
      std::copy_n(in.beta.begin() + (b * s.S + t) * ng, ng, beta.begin() + b * ng);
    }
    cpu::gated_delta_rule_recurrent_forward<double>(ot.data(), state.data(), q.data(), k.data(), v.data(), g.data(),
                                                    beta.data(), state.data(), one, 0.25);
    for (int64_t b = 0; b < s.B; ++b) std::copy_n(ot.begin() + b * nv, nv, o.begin() + (b * s.S + t) * nv);
  }
  auto scale_of = [](const std::vector<double>& x) {
    double m = 0;
    for (double e : x) m = std::max(m, std::abs(e));
    return m;
  };
  double err_o = 0, err_state = 0;
  for (size_t i = 0; i < o.size(); ++i) err_o = std::max(err_o, std::abs(o[i] - o_ref[i]));
  for (size_t i = 0; i < state.size(); ++i) err_state = std::max(err_state, std::abs(state[i] - final_ref[i]));
  EXPECT_LT(err_o, 1e-10 * scale_of(o_ref));
  EXPECT_LT(err_state, 1e-10 * scale_of(final_ref));
  EXPECT_GT(scale_of(o_ref), 0.1);  // a non-trivial output (not two zero tensors agreeing)
}

// In float, both forms stay within kFloatTol of the double reference, relative to each tensor's max magnitude.
// Observed errors are <= 1e-6 for both forms (dg, a reverse cumulative sum of cancelling terms, is the largest);
// 1e-5 leaves a 10x margin for other BLAS kernels / summation orders while any formula error shows up as >= 1e-3.
TEST(GatedDeltaRule, ChunkedMatchesRecurrentFloat) {
  constexpr double kFloatTol = 1e-5;
  struct Case {
    int64_t S, chunk;
  };
  for (const Case c : {Case{1, 64}, Case{63, 64}, Case{64, 64}, Case{65, 64}, Case{200, 64}, Case{13, 4}}) {
    const GdrShape s{2, c.S, 2, 4, 16, 12};
    const GdrInputs in = make_inputs(s, 1000 + c.S);
    const auto d_o = randn(in.v.size(), 2000 + c.S), d_f = randn(in.init.size(), 3000 + c.S);
    const GdrResult ref = run<double>(in, d_o, d_f, 0);
    const std::string what = "S=" + std::to_string(c.S) + " chunk=" + std::to_string(c.chunk);
    expect_all_close(run<float>(in, d_o, d_f, c.chunk), ref, kFloatTol, "float chunked " + what);
    expect_all_close(run<float>(in, d_o, d_f, 0), ref, kFloatTol, "float recurrent " + what);
  }
}

// The forward's chunk states (kept for the backward, the model's default) are exactly what the backward's own
// forward sweep recomputes: the same gradients bit for bit, for full and partial chunks, with and without an initial
// state; and the kept states are the recurrence's state before each chunk's first token.
TEST(GatedDeltaRule, KeptChunkStatesGiveTheRecomputedBackwardsBits) {
  struct Case {
    int64_t S, chunk;
    bool init;
  };
  for (const Case c : {Case{1, 64, true}, Case{64, 64, false}, Case{200, 64, true}, Case{13, 4, true}}) {
    SCOPED_TRACE("S=" + std::to_string(c.S) + " chunk=" + std::to_string(c.chunk));
    const GdrShape s{2, c.S, 2, 4, 16, 12};
    const GdrInputs in = make_inputs(s, 4000 + c.S);
    const auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v), g = cast<float>(in.g),
               beta = cast<float>(in.beta), init = cast<float>(in.init), d_o = cast<float>(randn(in.v.size(), 5000));
    const float* h0 = c.init ? init.data() : nullptr;
    const float sc = static_cast<float>(scale_of(s));
    const int64_t n = cpu::gated_delta_rule_chunk_states_elements(s, c.chunk);
    std::vector<float> o(v.size()), states(static_cast<size_t>(n), NAN);
    cpu::gated_delta_rule_chunked_forward<float>(o.data(), nullptr, q.data(), k.data(), v.data(), g.data(), beta.data(),
                                                 h0, s, sc, c.chunk, states.data());
    auto backward = [&](const float* kept) {
      std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), dg(g.size()), dbeta(beta.size()), dinit(init.size());
      cpu::gated_delta_rule_chunked_backward<float>(dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data(),
                                                    dinit.data(), d_o.data(), nullptr, q.data(), k.data(), v.data(),
                                                    g.data(), beta.data(), h0, s, sc, c.chunk, kept);
      return std::vector<std::vector<float>>{dq, dk, dv, dg, dbeta, dinit};
    };
    EXPECT_EQ(backward(states.data()), backward(nullptr));
    // The state entering chunk c of (b, value head) 1 is the recurrence's final state after c * chunk tokens.
    const int64_t C = std::min(c.chunk, c.S), chunks = (c.S + C - 1) / C, dkv = s.dk * s.dv;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const GdrShape prefix{s.B, ch * C, s.Hk, s.Hv, s.dk, s.dv};
      std::vector<double> op(static_cast<size_t>(prefix.B * prefix.S * s.Hv * s.dv)), fin(in.init.size());
      std::vector<double> qp, kp, vp, gp, bp;  // the first ch * C tokens of every sequence
      for (int64_t b = 0; b < s.B; ++b) {
        auto take = [&](const std::vector<double>& x, int64_t width, std::vector<double>& out) {
          out.insert(out.end(), x.begin() + b * s.S * width, x.begin() + (b * s.S + prefix.S) * width);
        };
        take(in.q, s.Hk * s.dk, qp);
        take(in.k, s.Hk * s.dk, kp);
        take(in.v, s.Hv * s.dv, vp);
        take(in.g, s.Hv, gp);
        take(in.beta, s.Hv, bp);
      }
      cpu::gated_delta_rule_recurrent_forward<double>(op.data(), fin.data(), qp.data(), kp.data(), vp.data(), gp.data(),
                                                      bp.data(), c.init ? in.init.data() : nullptr, prefix,
                                                      scale_of(s));
      for (int64_t e = 0; e < dkv; ++e)
        ASSERT_NEAR(states[static_cast<size_t>((1 * chunks + ch) * dkv + e)], fin[static_cast<size_t>(dkv + e)], 1e-5)
            << "chunk " << ch << " element " << e;
    }
  }
}

// Through Ops: the kept intermediates must have the size gated_delta_rule_saved_elements gives; another size is an
// error that names the fix, for the forward and the backward.
TEST(GatedDeltaRule, OpsRefuseKeptIntermediatesOfTheWrongSize) {
  CpuOps ops;
  const int64_t B = 1, S = 70, Hk = 1, Hv = 2, dk = 8, dv = 8;
  Tensor q = Tensor::zeros({B, S, Hk, dk}), k = Tensor::zeros({B, S, Hk, dk}), v = Tensor::zeros({B, S, Hv, dv}),
         g = Tensor::zeros({B, S, Hv}), beta = Tensor::zeros({B, S, Hv}), o = Tensor::zeros({B, S, Hv, dv});
  const int64_t n = gated_delta_rule_saved_elements(Device::cpu, B, S, Hk, Hv, dk, dv);
  EXPECT_EQ(n, B * Hv * 2 * dk * dv);  // two chunks of 64
  Tensor right = Tensor::zeros({n}), wrong = Tensor::zeros({n - 1});
  GdrStates save;
  save.save = &right;
  EXPECT_NO_THROW(ops.gated_delta_rule_forward(o, q, k, v, g, beta, 0.5, save));
  save.save = &wrong;
  try {
    ops.gated_delta_rule_forward(o, q, k, v, g, beta, 0.5, save);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gated_delta_rule_saved_elements"), std::string::npos) << e.what();
  }
  GdrStates saved;
  saved.saved = &wrong;
  Tensor dq = Tensor::zeros(q.shape()), dk_ = Tensor::zeros(k.shape()), dv_ = Tensor::zeros(v.shape()),
         dg = Tensor::zeros(g.shape()), db = Tensor::zeros(beta.shape());
  EXPECT_THROW(ops.gated_delta_rule_backward(dq, dk_, dv_, dg, db, o, q, k, v, g, beta, 0.5, saved), Error);
}

// Strong decays (g down to -30, exp(G) underflowing inside a chunk) stay finite and accurate in float.
TEST(GatedDeltaRule, StrongDecayStaysFiniteInFloat) {
  const GdrShape s{1, 130, 1, 2, 16, 16};
  GdrInputs in = make_inputs(s, 77, -30.0);
  for (size_t e = 0; e < in.g.size(); e += 3) in.g[e] *= 8.0;  // some large decays
  for (auto& x : in.g) x = std::max(x, -30.0);
  const auto d_o = randn(in.v.size(), 78), d_f = randn(in.init.size(), 79);
  const GdrResult ref = run<double>(in, d_o, d_f, 0);
  expect_all_close(run<float>(in, d_o, d_f, 64), ref, 1e-5, "strong decay float chunked");
}

// Value head j reads key head j / (Hv/Hk): the same as repeat_interleave'd q/k with Hk = Hv, and dq/dk are the sums
// over the value heads sharing a key head.
TEST(GatedDeltaRule, GroupedKeyHeadsMatchRepeatInterleave) {
  const GdrShape s{2, 9, 2, 6, 4, 3}, rep{2, 9, 6, 6, 4, 3};
  const int64_t r = s.Hv / s.Hk;
  const GdrInputs in = make_inputs(s, 55);
  GdrInputs in_rep = in;
  in_rep.s = rep;
  for (auto [src, dst] : {std::pair{&in.q, &in_rep.q}, std::pair{&in.k, &in_rep.k}}) {
    dst->assign(rep.B * rep.S * rep.Hk * rep.dk, 0.0);
    for (int64_t bt = 0; bt < s.B * s.S; ++bt)
      for (int64_t hv = 0; hv < s.Hv; ++hv)
        for (int64_t i = 0; i < s.dk; ++i)
          (*dst)[(bt * s.Hv + hv) * s.dk + i] = (*src)[(bt * s.Hk + hv / r) * s.dk + i];
  }
  const auto d_o = randn(in.v.size(), 56), d_f = randn(in.init.size(), 57);
  for (const int64_t chunk : {0, 4}) {
    const GdrResult a = run<double>(in, d_o, d_f, chunk), b = run<double>(in_rep, d_o, d_f, chunk);
    expect_close(a.o, b.o, 1e-13, "o");
    expect_close(a.fin, b.fin, 1e-13, "final_state");
    expect_close(a.dv, b.dv, 1e-13, "dv");
    expect_close(a.dg, b.dg, 1e-13, "dg");
    expect_close(a.dbeta, b.dbeta, 1e-13, "dbeta");
    expect_close(a.dinit, b.dinit, 1e-13, "d_initial_state");
    for (auto [ga, gb] : {std::pair{&a.dq, &b.dq}, std::pair{&a.dk, &b.dk}}) {
      std::vector<double> summed(ga->size(), 0.0);
      for (int64_t bt = 0; bt < s.B * s.S; ++bt)
        for (int64_t hv = 0; hv < s.Hv; ++hv)
          for (int64_t i = 0; i < s.dk; ++i)
            summed[(bt * s.Hk + hv / r) * s.dk + i] += (*gb)[(bt * s.Hv + hv) * s.dk + i];
      expect_close(*ga, summed, 1e-13, "dq/dk");
    }
  }
}

// nullptr initial state / d_final_state mean zero; nullptr gradients are skipped; backward accumulates.
TEST(GatedDeltaRule, OptionalArgumentsAndAccumulation) {
  const GdrShape s{1, 11, 1, 2, 3, 4};
  GdrInputs in = make_inputs(s, 91);
  const auto d_o = randn(in.v.size(), 92);
  const std::vector<double> zero_state(in.init.size(), 0.0);
  in.init = zero_state;
  const GdrResult ref = run<double>(in, d_o, zero_state, 0);
  const double sc = scale_of(s);
  for (const int64_t chunk : {0, 4}) {
    std::vector<double> o(in.v.size()), dq(in.q.size()), dk(in.k.size()), dv(in.v.size()), dg(in.g.size());
    std::vector<double> dbeta(in.beta.size());
    if (chunk > 0)
      cpu::gated_delta_rule_chunked_forward<double>(o.data(), nullptr, in.q.data(), in.k.data(), in.v.data(),
                                                    in.g.data(), in.beta.data(), nullptr, s, sc, chunk);
    else
      cpu::gated_delta_rule_recurrent_forward<double>(o.data(), nullptr, in.q.data(), in.k.data(), in.v.data(),
                                                      in.g.data(), in.beta.data(), nullptr, s, sc);
    expect_close(o, ref.o, 1e-12, "o without initial state");
    for (int rep = 0; rep < 2; ++rep) {
      // First call: only dq, dk, dg; second call: only dv, dbeta (and dq again, to see it accumulate).
      double* gq = dq.data();
      double* gk = rep == 0 ? dk.data() : nullptr;
      double* gv = rep == 1 ? dv.data() : nullptr;
      double* gg = rep == 0 ? dg.data() : nullptr;
      double* gb = rep == 1 ? dbeta.data() : nullptr;
      if (chunk > 0)
        cpu::gated_delta_rule_chunked_backward<double>(gq, gk, gv, gg, gb, nullptr, d_o.data(), nullptr, in.q.data(),
                                                       in.k.data(), in.v.data(), in.g.data(), in.beta.data(), nullptr,
                                                       s, sc, chunk);
      else
        cpu::gated_delta_rule_recurrent_backward<double>(gq, gk, gv, gg, gb, nullptr, d_o.data(), nullptr, in.q.data(),
                                                         in.k.data(), in.v.data(), in.g.data(), in.beta.data(), nullptr,
                                                         s, sc);
    }
    std::vector<double> dq2(ref.dq);
    for (auto& x : dq2) x *= 2;
    expect_close(dq, dq2, 1e-12, "dq accumulated twice");
    expect_close(dk, ref.dk, 1e-12, "dk");
    expect_close(dv, ref.dv, 1e-12, "dv");
    expect_close(dg, ref.dg, 1e-12, "dg");
    expect_close(dbeta, ref.dbeta, 1e-12, "dbeta");
  }
}

// An empty sequence passes the state through: final_state = initial_state, d_initial_state += d_final_state.
TEST(GatedDeltaRule, EmptySequencePassesStateThrough) {
  const GdrShape s{2, 0, 1, 2, 3, 4};
  const auto init = randn(s.B * s.Hv * s.dk * s.dv, 5), d_f = randn(init.size(), 6);
  for (const int64_t chunk : {0, 64}) {
    std::vector<double> fin(init.size(), -1.0), dinit(init.size(), 0.0);
    const double* none = nullptr;
    if (chunk > 0) {
      cpu::gated_delta_rule_chunked_forward<double>(nullptr, fin.data(), none, none, none, none, none, init.data(), s,
                                                    1.0, chunk);
      cpu::gated_delta_rule_chunked_backward<double>(nullptr, nullptr, nullptr, nullptr, nullptr, dinit.data(), none,
                                                     d_f.data(), none, none, none, none, none, init.data(), s, 1.0,
                                                     chunk);
    } else {
      cpu::gated_delta_rule_recurrent_forward<double>(nullptr, fin.data(), none, none, none, none, none, init.data(), s,
                                                      1.0);
      cpu::gated_delta_rule_recurrent_backward<double>(nullptr, nullptr, nullptr, nullptr, nullptr, dinit.data(), none,
                                                       d_f.data(), none, none, none, none, none, init.data(), s, 1.0);
    }
    EXPECT_EQ(fin, init);
    EXPECT_EQ(dinit, d_f);
  }
}

}  // namespace nextron::test
