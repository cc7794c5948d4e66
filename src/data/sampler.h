// The training and validation sample streams over one or more token datasets (rules in docs/formats.md).
//
// A sample is seq_len + 1 consecutive tokens of one dataset's token stream (documents and their EOS ids back to
// back, Megatron style): sample i covers tokens [i * seq_len, i * seq_len + seq_len + 1), so consecutive samples
// overlap by one token and a dataset of T tokens holds (T - 1) / seq_len samples. Each dataset's samples are split
// once into validation and training samples by a seeded permutation; the training stream blends the datasets by
// weight and shuffles each dataset's training samples with a fresh permutation per epoch.
//
// Everything is addressable: training sample `index` (a global sample counter over the whole run) maps to a
// (dataset, sample) pair by a pure function of (seed, weights, dataset sizes, seq_len, valid_fraction, shuffle),
// nothing is stored on disk and nothing depends on what was read before. A checkpoint records the position (the next
// global index); a resumed run sets it and continues with exactly the next sample. Data parallelism needs no other
// format: rank r of R reads global indices r, r + R, ... (or the r-th contiguous block of each global batch).
//
// Not thread-safe (the blending cache and HDF5 reads): use one SampleStream per thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/token_dataset.h"

namespace nextron {

struct DatasetSpec {
  std::string path;     // a file written by tools/preprocess.py
  double weight = 1.0;  // relative share of the training stream (> 0; normalised over all specs)
};

// Where a stream sample comes from: dataset `dataset`'s sample `sample`, tokens
// [sample * seq_len, sample * seq_len + seq_len + 1) of that dataset.
struct SampleRef {
  int dataset = 0;
  int64_t sample = 0;
  int64_t epoch = 0;  // training: the pass over that dataset's training samples; validation: 0
  bool operator==(const SampleRef&) const = default;
};

class SampleStream {
 public:
  // Opens every dataset (all must share one tokenizer). valid_fraction in [0, 1) of each dataset's samples is held
  // out for validation. shuffle = false keeps everything in file order (validation = the last samples of each
  // dataset, training epochs in order): for tests and debugging.
  SampleStream(const std::vector<DatasetSpec>& specs, int64_t seq_len, double valid_fraction, uint64_t seed,
               bool shuffle = true);

  int64_t seq_len() const { return seq_len_; }
  int num_datasets() const { return static_cast<int>(datasets_.size()); }
  const TokenDataset& dataset(int d) const { return datasets_.at(static_cast<size_t>(d)); }
  // The weight of dataset d, normalised so that the weights sum to 1.
  double weight(int d) const { return weights_.at(static_cast<size_t>(d)); }
  // The largest vocab_size over the datasets (check_vocab each dataset against the model).
  int64_t vocab_size() const { return vocab_size_; }
  // Samples of dataset d: all of them, one training epoch, and the held-out ones; then all datasets' held-out ones.
  int64_t num_samples(int d) const;
  int64_t num_train_samples(int d) const;
  int64_t num_valid_samples(int d) const;
  int64_t num_valid_samples() const { return valid_begin_.back(); }

  // Training stream: global index >= 0 (unbounded; datasets wrap into new epochs).
  SampleRef locate_train(int64_t index);
  void train_sample(int64_t index, int64_t* out);  // out: seq_len + 1 tokens
  // Validation samples, dataset 0's first, then dataset 1's, ...: index in [0, num_valid_samples()).
  SampleRef locate_valid(int64_t index) const;
  void valid_sample(int64_t index, int64_t* out) const;
  void read(const SampleRef& ref, int64_t* out) const;

  // Sequential reading: next() returns training sample position() and advances it. A checkpoint stores position();
  // set_position(p) on a fresh stream resumes with sample p.
  int64_t position() const { return position_; }
  void set_position(int64_t position);
  void next(int64_t* out);

  // A hash of everything the sample order depends on (seed, seq_len, valid_fraction, shuffle, weights, dataset
  // sizes and tokenizers): a checkpoint stores it next to the position so a resume with other data is caught.
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  int64_t train_to_sample(int d, int64_t epoch, int64_t i) const;  // i-th training sample of dataset d in epoch
  int64_t split_to_sample(int d, int64_t j) const;  // j-th sample of dataset d in split order (valid first)
  void blend_step(int64_t index, std::vector<int64_t>& counts, int* dataset, int64_t* count) const;

  std::vector<TokenDataset> datasets_;
  std::vector<double> weights_;
  std::vector<int64_t> num_samples_, num_valid_;
  std::vector<int64_t> valid_begin_;  // prefix sums of num_valid_ (num_datasets + 1 entries)
  int64_t seq_len_ = 0;
  uint64_t seed_ = 0;
  bool shuffle_ = true;
  int64_t vocab_size_ = 0;
  uint64_t fingerprint_ = 0;
  int64_t position_ = 0;
  // Blending state: per-dataset sample counts before global index cursor_, and the same every kCheckpointStride
  // indices (checkpoints_[k] = counts before index k * stride), so random access replays at most one stride.
  int64_t cursor_ = 0;
  std::vector<int64_t> cursor_counts_;
  std::vector<std::vector<int64_t>> checkpoints_;
};

}  // namespace nextron
