#include "train/options.h"

#include <cmath>

#include "core/error.h"

namespace nextron {

void TrainOptions::validate(bool need_data) const {
  NEXTRON_CHECK(model_config.empty() != init_from.empty(),
                "give exactly one of --model-config (train from random weights) and --init-from (start from an HF "
                "checkpoint)");
  NEXTRON_CHECK(!need_data || !data.empty(),
                "no training data: pass --data PATH.h5 (make one with tools/preprocess.py)");
  for (const auto& d : data)
    NEXTRON_CHECK(d.weight > 0, "--data ", d.path, ": blending weight must be positive, got ", d.weight);
  NEXTRON_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device, "'");
  NEXTRON_CHECK(device == "cpu" || peak_tflops > 0,
                "--device cuda needs --peak-tflops (the GPU's bf16 peak in TFLOP/s for MFU, e.g. the measured GEMM "
                "rate of `nextron-bench-cuda --what gemm`, or the data-sheet value such as 989 for an H100 SXM)");
  NEXTRON_CHECK(seq_len > 0, "--seq-len must be positive, got ", seq_len);
  NEXTRON_CHECK(valid_fraction >= 0 && valid_fraction < 1, "--valid-fraction must be in [0, 1), got ", valid_fraction);
  NEXTRON_CHECK(micro_batch > 0, "--micro-batch-size must be positive, got ", micro_batch);
  NEXTRON_CHECK(global_batch > 0, "--global-batch-size must be positive, got ", global_batch);
  NEXTRON_CHECK(global_batch % micro_batch == 0, "--global-batch-size (", global_batch,
                ") must be a multiple of --micro-batch-size (", micro_batch, ")");
  NEXTRON_CHECK(train_steps > 0, "--train-steps must be positive, got ", train_steps);
  NEXTRON_CHECK(clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping), got ", clip_grad);
  NEXTRON_CHECK(save_interval >= 0, "--save-interval must be >= 0, got ", save_interval);
  NEXTRON_CHECK(keep_last > 0, "--keep-last must be positive, got ", keep_last);
  NEXTRON_CHECK(!save_dir.empty() || save_interval == 0, "--save-interval needs --save DIR");
  NEXTRON_CHECK(!save_dir.empty() || !overwrite_save, "--overwrite-save needs --save DIR");
  NEXTRON_CHECK(log_interval > 0, "--log-interval must be positive, got ", log_interval);
  NEXTRON_CHECK(eval_interval >= 0, "--eval-interval must be >= 0, got ", eval_interval);
  NEXTRON_CHECK(eval_iters > 0, "--eval-iters must be positive, got ", eval_iters);
  NEXTRON_CHECK(eval_interval == 0 || valid_fraction > 0, "--eval-interval needs --valid-fraction > 0");
  NEXTRON_CHECK(sample_interval >= 0, "--sample-interval must be >= 0, got ", sample_interval);
  NEXTRON_CHECK(sample_interval == 0 || !sample_prompts.empty(), "--sample-interval needs --sample-prompts FILE");
  NEXTRON_CHECK(sample_interval == 0 || !save_dir.empty(),
                "--sample-interval needs --save DIR (the samples go to DIR/samples.jsonl)");
  NEXTRON_CHECK(sample_interval > 0 || sample_prompts.empty(), "--sample-prompts needs --sample-interval N");
  NEXTRON_CHECK(sample_max_new_tokens > 0, "--sample-max-new-tokens must be positive, got ", sample_max_new_tokens);
  NEXTRON_CHECK(peak_tflops >= 0, "--peak-tflops must be >= 0, got ", peak_tflops);
  NEXTRON_CHECK(threads >= 0, "--threads must be >= 0, got ", threads);
  nextron::validate(adam);
  recompute.validate();
  NEXTRON_CHECK(std::isnan(expert_capacity_factor) || expert_capacity_factor > 0, "--moe-expert-capacity-factor ",
                expert_capacity_factor, " must be > 0 (leave it unset for dropless MoE)");
  NEXTRON_CHECK(token_drop_policy == "probs" || token_drop_policy == "position", "--moe-token-drop-policy ",
                token_drop_policy, ": use probs (keep the highest routing weights) or position (keep the earliest)");
  NEXTRON_CHECK(!pad_to_capacity || !std::isnan(expert_capacity_factor),
                "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor (the capacity to pad to)");
  NEXTRON_CHECK(vocab_divisible_by >= 1 && vocab_divisible_by <= 65536, "--make-vocab-size-divisible-by ",
                vocab_divisible_by, " must be in [1, 65536] (1: pad only to a multiple of TP)");
}

}  // namespace nextron
