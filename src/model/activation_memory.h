// Activation memory: the bytes one micro-batch's activation record (ModelActivations) holds between its forward and
// its backward, as a closed form of the config, the micro-batch shape, the parallel layout and the recomputation
// options. A pipeline stage holds at most its schedule's in-flight bound of records at once (parallel/schedule.h), so
// its peak activation memory is that bound times this; the per-layer and per-module scratch (one copy however many
// micro-batches are in flight) is not part of it.
//
// Under expert parallelism a MoE layer's record depends on how many rows its experts receive; the formula assumes
// balanced routing (as many received as sent), which --moe-router-force-load-balancing makes exact.
//
// The formula follows what each module's forward writes into its record (the Saved structs' comments list the
// shapes); tests/unit/test_activation_memory.cpp measures a fresh record's growth of live memory on every fixture,
// stage kind and recomputation option and requires it to equal this, byte for byte.
#pragma once

#include <array>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "comm/context_parallel.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/recompute.h"
#include "model/stage.h"

namespace nextron {

struct ModelActivations;

struct ActivationShape {
  int64_t B = 1, S = 1;  // the micro-batch
  int64_t tp = 1;        // the tensor-parallel size (the config passed in is already the rank's slice)
  bool sequence_parallel = false;
  bool pipeline = false;  // the record also holds the stage-boundary gradients (pipeline runs)
  // Context parallelism: S is this rank's tokens (Sl); the mixers also keep every segment's conv input with its
  // halo, the incoming DeltaNet states and every chunk's transition, and the keys and values gathered up to each
  // segment's end.
  int64_t cp = 1, cp_rank = 0;
  CpOrder cp_order = CpOrder::zigzag;
  Device device = Device::cpu;  // the backend: its activation dtype and its MoE dispatch layout
};

struct ActivationBytes {
  int64_t io = 0;               // ids, the layer inputs/outputs kept, router statistics, boundary gradients
  std::vector<int64_t> layers;  // each decoder layer's record (0 when a full recomputation group holds it)
  int64_t head = 0;             // final norm, logits, loss rows and targets
  // Of the total, the bytes outside Tensors (host vectors: the CPU MoE state, the dispatch plans, the host targets,
  // CP's DeltaNet transitions); a device's memory holds total() - host.
  int64_t host = 0;
  int64_t total() const;
};

// local: the rank's slice of the model config (Model::local_config()); stage: the layers this model holds.
ActivationBytes activation_record_bytes(const ModelConfig& local, const StageRange& stage, const ActivationShape& shape,
                                        const RecomputeOptions& recompute);

// The buffers a stage keeps outside its records, one copy however many micro-batches are in flight: the decoder
// layers' modules' forward and backward scratch, one copy per layer kind (DecoderLayer::Scratch) (the branch outputs,
// every gradient buffer, the recomputed parts' outputs under selective recomputation, the EP dispatcher's send and
// receive rows, index and RoPE tables), the model's (the running input gradients, dlogits, the vocab-parallel loss's
// statistics, the embedding's partial rows) and under full recomputation one group's layer records (a record slot
// reused by layers of different kinds keeps each kind's tensors). Tensors only, at their steady-state sizes after a
// micro-batch's forward and backward; the vocabulary mask (< V / TP floats) and the CUDA backend's kernel workspaces
// are left out. tests/unit/test_activation_memory.cpp measures it on every fixture and recomputation option, byte for
// byte.
struct ScratchBytes {
  int64_t model = 0;            // the Model's own buffers (incl. full recomputation's group scratch)
  std::vector<int64_t> layers;  // each decoder layer's (the first of each kind also holds the kind's shared scratch)
  int64_t transient = 0;        // the largest buffer living only inside one call (CP's gathered keys and values)
  int64_t total() const;
};
// What the models of a rank that share one LayerScratchPool (its pipeline chunks, model/decoder.h) have counted so
// far: the layer kinds whose Scratch they hold, and full recomputation's group scratch (per position of the group
// records, the bytes each record part reached: the norms' and residual's, attention's, DeltaNet's, the dense MLP's,
// the MoE's; the widest group).
struct SharedScratchCount {
  std::set<std::pair<MixerType, MlpType>> kinds;
  std::vector<std::array<int64_t, 5>> group_positions;
  int64_t group_bytes = 0;
};
// counted: what the rank's other models already hold (updated with this stage's additions, which are all the
// result counts); nullptr: the stage alone.
ScratchBytes scratch_bytes(const ModelConfig& local, const StageRange& stage, const ActivationShape& shape,
                           const RecomputeOptions& recompute, SharedScratchCount* counted = nullptr);

// Host memory a record holds outside Tensors (its targets and the CPU backend's MoE dispatch); Tensors are counted by
// live_tensor_bytes() (core/tensor.h). Together they are the measured side of the formula.
int64_t record_host_bytes(const ModelActivations& a);

}  // namespace nextron
