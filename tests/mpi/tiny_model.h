// The tiny Qwen3-Next of the parallel tests (tests/mpi): both mixer types (DeltaNet, attention, DeltaNet with a dense
// MLP, attention), NH 4 with NKV 2 (KV heads replicated at TP 4), Hk 4 with Hv 8, 8 experts top-2 with a shared
// expert in the three MoE layers, vocab 64. kTiny* are its dimensions, for closed-form formulas.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/param_table.h"

namespace nextron::test {

inline constexpr int64_t kTinyVocab = 64, kTinyHidden = 32, kTinyLayers = 4, kTinyFullLayers = 2, kTinyLinearLayers = 2,
                         kTinyMoeLayers = 3, kTinySharedLayers = 3, kTinyTopK = 2, kTinyExperts = 8, kTinyHeadDim = 8,
                         kTinyKvHeads = 2, kTinyValueHeadDim = 8;

inline const char* kTinyConfig = R"({
  "model_type": "qwen3_next", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
  "num_hidden_layers": 4, "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
  "mlp_only_layers": [2], "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "partial_rotary_factor": 0.25, "rope_theta": 10000, "linear_num_key_heads": 4, "linear_num_value_heads": 8,
  "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "num_experts": 8,
  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
  "decoder_sparse_step": 1, "norm_topk_prob": true, "router_aux_loss_coef": 0.1, "rms_norm_eps": 1e-6,
  "tie_word_embeddings": false, "hidden_act": "silu", "attention_bias": false
})";

// The config written once per process to a temporary file (Trainer reads a path).
inline std::string tiny_config_path() {
  static const std::string path = [] {
    const auto p = std::filesystem::temp_directory_path() / ("nextron-tiny-" + std::to_string(::getpid()) + ".json");
    std::ofstream(p) << kTinyConfig;
    return p.string();
  }();
  return path;
}

// The same model with the mission's expert count at tiny width: 64 experts, top-8, intermediate 8.
inline std::string tiny_many_experts_config_path() {
  static const std::string path = [] {
    std::string text = kTinyConfig;
    auto set = [&text](const std::string& key, const std::string& from, const std::string& to) {
      const std::string a = "\"" + key + "\": " + from, b = "\"" + key + "\": " + to;
      const size_t at = text.find(a);
      if (at == std::string::npos) std::abort();
      text.replace(at, a.size(), b);
    };
    set("num_experts", "8", "64");
    set("num_experts_per_tok", "2", "8");
    set("moe_intermediate_size", "16", "8");
    const auto p = std::filesystem::temp_directory_path() / ("nextron-tiny64-" + std::to_string(::getpid()) + ".json");
    std::ofstream(p) << text;
    return p.string();
  }();
  return path;
}

// Training sample `index` of seq_len + 1 tokens, a fixed function of the index.
inline void tiny_sample(int64_t index, int64_t* out, int64_t seq_len) {
  for (int64_t t = 0; t <= seq_len; ++t) out[t] = (index * 7919 + t * 104729 + (index * t) % 13) % kTinyVocab;
}

// Compares two whole-model flat buffers (the tiny model's single-device layout) tensor by tensor: every tensor's
// largest |got - want| must be within abs + rel * its largest |want|. Returns the worst ratio diff / max|want| over
// the tensors (what the docs report); NEXTRON_EQUIV_VERBOSE=1 prints each new worst tensor.
inline double expect_tensors_close(const std::vector<float>& got, const std::vector<float>& want, double rel,
                                   double abs, const char* what, const std::string& config = tiny_config_path()) {
  const ParamTable table(ModelConfig::from_file(config));
  EXPECT_EQ(got.size(), want.size());
  if (got.size() != want.size()) return INFINITY;
  double worst = 0;
  for (const ParamSpec& s : table.specs()) {
    double diff = 0, scale = 0;
    for (int64_t i = s.offset; i < s.offset + s.numel(); ++i) {
      diff = std::max(diff, std::fabs(double(got[i]) - double(want[i])));
      scale = std::max(scale, std::fabs(double(want[i])));
    }
    EXPECT_LE(diff, abs + rel * scale) << what << " of " << s.name << ": max |diff| " << diff << ", max |ref| "
                                       << scale;
    if (scale > 0 && diff / scale > worst) {
      worst = diff / scale;
      if (std::getenv("NEXTRON_EQUIV_VERBOSE")) std::printf("  %s %s %.2e\n", what, s.name.c_str(), worst);
    }
  }
  return worst;
}

}  // namespace nextron::test
