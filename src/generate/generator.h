// Text generation from a model with caches (model/inference_cache.h): prompts of any lengths are prefilled one by
// one into the slots of one cache (the chunked kernels), then decoded together one token per step (the recurrent
// DeltaNet step and the attention KV cache), each with its own stopping point. Sampling follows transformers'
// logits processors in their order: temperature, then top-k, then top-p; temperature 0 is greedy (the first of equal
// maxima, as torch.argmax).
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"

namespace nextron {

struct SamplingOptions {
  double temperature = 0;  // 0: greedy
  int64_t top_k = 0;       // keep the k most likely tokens (0: all)
  double top_p = 1.0;      // keep the smallest set of most likely tokens whose probability reaches top_p (1: all)
  uint64_t seed = 0;       // the sampler's random stream (one per generate() call)
  // Throws nextron::Error naming the option for values outside their ranges.
  void validate() const;
};

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
  std::vector<int64_t> eos_ids;           // a sampled id among these ends the sequence (it is kept in ids)
  std::vector<std::string> stop_strings;  // the decoded text reaching one ends the sequence (needs `decode`)
  int64_t batch_size = 8;                 // prompts decoded together (one cache of this many slots)
  int64_t max_positions = 0;              // the model's limit (prompt + new tokens); 0: none
  bool keep_logits = false;               // keep every step's logits in Generation::logits
};

struct Generation {
  std::vector<int64_t> prompt;             // the prompt's ids
  std::vector<int64_t> ids;                // the new tokens
  std::string text;                        // decode(ids), cut before a stop string (empty without a decoder)
  std::string finish_reason;               // "eos", "stop" or "length"
  std::vector<std::vector<float>> logits;  // (new tokens, V): the logits each new token was chosen from (keep_logits)
};

// Where the time went: prompt tokens through the chunked prefill, new tokens through one-token decode steps.
struct GenerateStats {
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

// The next token from one row of V logits (fp32, the model's whole vocabulary).
int64_t sample_token(const float* logits, int64_t V, const SamplingOptions& options, std::mt19937_64& rng);

// Generates for every prompt (ids in [0, vocab)); decode (may be empty) turns ids into text for the outputs and the
// stop strings. Every problem with the input is a nextron::Error naming it, raised before any token is generated.
using Decoder = std::function<std::string(const std::vector<int64_t>&)>;
std::vector<Generation> generate(Model& model, const std::vector<std::vector<int64_t>>& prompts,
                                 const GenerateOptions& options, const Decoder& decode = {},
                                 GenerateStats* stats = nullptr);

}  // namespace nextron
