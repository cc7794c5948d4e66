// Which layers each pipeline rank holds. The model's decoder layers are cut into PP x VPP contiguous virtual stages
// (the embedding on the first, final norm + lm_head + loss on the last); rank r holds the VPP chunks c = 0..VPP-1,
// chunk c being virtual stage c * PP + r (Megatron's interleaved assignment: with VPP 1, rank r is stage r).
//
// By default the layers are split evenly. Megatron's two ways to say otherwise:
//   --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers: the first / last stage holds that many
//     layers and the other stages split the rest evenly (VPP 1);
//   --pipeline-model-parallel-layout: every virtual stage spelled out, in virtual-stage order, stages separated by
//     '|': 'E' the embedding, 't' a decoder layer, 'L' the loss (final norm, lm_head, loss); 'x*n' repeats a symbol
//     and '(...)*n' a group; ',' and spaces are only for reading. E.g. "Ettt|tttt|ttt|tL" splits 14 layers as
//     3, 4, 3, 4 over PP 4; "E(t|)*3tL" is PP 2 x VPP 2 with one layer per chunk. The stage count is PP x VPP, so
//     the layout also sets VPP.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/stage.h"

namespace nextron {

struct PipelineSplit {
  std::string layout;              // --pipeline-model-parallel-layout ("" : unset)
  int64_t first_stage_layers = 0;  // --decoder-first-pipeline-num-layers (0: unset)
  int64_t last_stage_layers = 0;   // --decoder-last-pipeline-num-layers (0: unset)
  bool uneven() const { return !layout.empty() || first_stage_layers > 0 || last_stage_layers > 0; }
};

// The PP x VPP virtual stages, in model order. Throws nextron::Error naming the problem and the fix (a layer count
// that does not split, a malformed layout string, a layout whose stage count is not a multiple of PP or that
// disagrees with VPP, E or L misplaced, an empty middle stage).
std::vector<StageRange> pipeline_stages(const ModelConfig& config, int pp, int vpp, const PipelineSplit& split = {});

// The number of virtual stages per rank that `split` implies at pipeline size pp (layout stages / PP), or `vpp`
// when the split does not say.
int pipeline_chunks(const PipelineSplit& split, int pp, int vpp);

// Pipeline rank `pp_rank`'s chunks, in chunk order: virtual stages c * pp + pp_rank.
std::vector<StageRange> rank_chunks(const std::vector<StageRange>& stages, int pp, int pp_rank);

}  // namespace nextron
