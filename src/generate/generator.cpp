#include "generate/generator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace nextron {

void SamplingOptions::validate() const {
  NEXTRON_CHECK(std::isfinite(temperature) && temperature >= 0, "--temperature must be >= 0 (0: greedy), got ",
                temperature);
  NEXTRON_CHECK(top_k >= 0, "--top-k must be >= 0 (0: no limit), got ", top_k);
  NEXTRON_CHECK(top_p > 0 && top_p <= 1, "--top-p must be in (0, 1], got ", top_p);
}

int64_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, std::mt19937_64& rng) {
  if (o.temperature == 0) return std::max_element(logits, logits + V) - logits;  // the first maximum
  // Scaled logits of the candidates, most likely first (ties by id, so the order is deterministic: a strict total
  // order, the prefix a stable sort by logit would give).
  const auto before = [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  size_t keep = order.size();
  if (o.top_k > 0 && o.top_k < V) {
    // As transformers' TopKLogitsWarper: every token scoring below the k-th best is removed (ties with it stay).
    // Only those are ordered: the k-th best by selection (O(V)), then the kept ones sorted (O(k log k)).
    const size_t k = size_t(o.top_k);
    std::nth_element(order.begin(), order.begin() + long(k - 1), order.end(), before);
    const float kth = logits[order[k - 1]];
    const auto kept_end = std::partition(order.begin(), order.end(), [&](int64_t i) { return logits[i] >= kth; });
    keep = size_t(kept_end - order.begin());
    std::sort(order.begin(), kept_end, before);
  } else {
    std::sort(order.begin(), order.end(), before);
  }
  std::vector<double> p(keep);
  const double top = double(logits[order[0]]) / o.temperature;
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += p[i] = std::exp(double(logits[order[i]]) / o.temperature - top);
  for (double& x : p) x /= sum;
  if (o.top_p < 1) {
    // The smallest prefix whose probability reaches top_p (at least one token), as TopPLogitsWarper.
    double cum = 0;
    size_t n = 0;
    while (n < keep && cum < o.top_p) cum += p[n++];
    keep = std::max<size_t>(n, 1);
    p.resize(keep);
  }
  std::discrete_distribution<size_t> pick(p.begin(), p.end());
  return order[pick(rng)];
}

namespace {

// Slot state of one batch of prompts.
struct Slot {
  size_t prompt = 0;  // index into the prompts
  bool done = false;
};

// Whether the sequence is finished after its newest token, and why.
bool finished(Generation& g, const GenerateOptions& o, const Decoder& decode) {
  if (!g.ids.empty() && std::find(o.eos_ids.begin(), o.eos_ids.end(), g.ids.back()) != o.eos_ids.end()) {
    g.finish_reason = "eos";
    return true;
  }
  if (decode && !o.stop_strings.empty()) {
    const std::string text = decode(g.ids);
    size_t cut = std::string::npos;
    for (const std::string& s : o.stop_strings) cut = std::min(cut, text.find(s));
    if (cut != std::string::npos) {
      g.finish_reason = "stop";
      g.text = text.substr(0, cut);
      return true;
    }
  }
  if (static_cast<int64_t>(g.ids.size()) >= o.max_new_tokens) {
    g.finish_reason = "length";
    return true;
  }
  return false;
}

}  // namespace

std::vector<Generation> generate(Model& model, const std::vector<std::vector<int64_t>>& prompts,
                                 const GenerateOptions& o, const Decoder& decode, GenerateStats* stats) {
  o.sampling.validate();
  NEXTRON_CHECK(o.max_new_tokens > 0, "--max-new-tokens must be positive, got ", o.max_new_tokens);
  NEXTRON_CHECK(o.batch_size > 0, "--batch-size must be positive, got ", o.batch_size);
  NEXTRON_CHECK(o.stop_strings.empty() || decode, "stop strings need a tokenizer to decode the generated ids");
  for (const std::string& s : o.stop_strings) NEXTRON_CHECK(!s.empty(), "a stop string must not be empty");
  const int64_t V = model.config().vocab_size;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& p = prompts[i];
    NEXTRON_CHECK(!p.empty(), "prompt ", i, " is empty: generation continues a prompt of at least one token");
    for (int64_t id : p)
      NEXTRON_CHECK(id >= 0 && id < V, "prompt ", i, ": token id ", id, " is outside the model's vocabulary [0, ", V,
                    ")");
    NEXTRON_CHECK(o.max_positions <= 0 || int64_t(p.size()) + o.max_new_tokens <= o.max_positions, "prompt ", i,
                  " has ", p.size(), " tokens; with ", o.max_new_tokens, " new tokens it exceeds the model's limit of ",
                  o.max_positions,
                  " positions (max_position_embeddings): shorten the prompt or lower --max-new-tokens");
  }
  std::vector<Generation> out(prompts.size());
  std::mt19937_64 rng(o.sampling.seed);
  GenerateStats local;
  GenerateStats& st = stats ? *stats : local;
  using Clock = std::chrono::steady_clock;
  auto seconds_since = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  // Every new token: chosen from its logits row (kept when asked), then the stopping rules.
  auto take = [&](Generation& g, const float* logits) {
    if (o.keep_logits) g.logits.emplace_back(logits, logits + V);
    g.ids.push_back(sample_token(logits, V, o.sampling, rng));
    return finished(g, o, decode);
  };
  for (size_t first = 0; first < prompts.size(); first += size_t(o.batch_size)) {
    const size_t B = std::min(prompts.size() - first, size_t(o.batch_size));
    int64_t longest = 0;
    for (size_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, int64_t(prompts[first + b].size()));
    InferenceCache cache = model.new_inference_cache(int64_t(B), longest + o.max_new_tokens);
    std::vector<Slot> slots(B);
    // Prefill: each prompt in its slot; its logits give the first new token.
    for (size_t b = 0; b < B; ++b) {
      Generation& g = out[first + b];
      g.prompt = prompts[first + b];
      slots[b].prompt = first + b;
      const auto t0 = Clock::now();
      const std::vector<float> logits =
          model.forward_cached(cache, int64_t(b), g.prompt.data(), 1, int64_t(g.prompt.size()));
      st.prefill_seconds += seconds_since(t0);
      st.prefill_tokens += int64_t(g.prompt.size());
      slots[b].done = take(g, logits.data());
    }
    // Decode: every run of consecutive unfinished slots steps together.
    for (;;) {
      size_t b = 0;
      bool any = false;
      while (b < B) {
        if (slots[b].done) {
          ++b;
          continue;
        }
        size_t e = b;
        std::vector<int64_t> ids;
        while (e < B && !slots[e].done) ids.push_back(out[slots[e++].prompt].ids.back());
        const auto t0 = Clock::now();
        const std::vector<float> logits = model.forward_cached(cache, int64_t(b), ids.data(), int64_t(e - b), 1);
        st.decode_seconds += seconds_since(t0);
        st.decode_tokens += int64_t(e - b);
        for (size_t i = b; i < e; ++i) slots[i].done = take(out[slots[i].prompt], logits.data() + (i - b) * V);
        any = true;
        b = e;
      }
      if (!any) break;
    }
  }
  if (decode)
    for (Generation& g : out)
      if (g.finish_reason != "stop") g.text = decode(g.ids);
  return out;
}

}  // namespace nextron
