#include "data/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "core/error.h"

namespace nextron {

namespace {

constexpr int64_t kCheckpointStride = int64_t{1} << 14;
constexpr uint64_t kSplitTag = 0x73706c6974ULL;  // "split"
constexpr uint64_t kEpochTag = 0x65706f6368ULL;  // "epoch"

// splitmix64's finaliser: a bijective 64-bit mix.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t combine(uint64_t h, uint64_t v) { return mix64(h ^ (mix64(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2))); }

uint64_t hash_string(const std::string& s) {  // FNV-1a: stable across platforms and runs
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

// A pseudo-random permutation of [0, n) keyed by `key`, evaluated per element in O(1) time and memory: a 6-round
// balanced Feistel network on the smallest even number of bits covering n, cycle-walked back into [0, n) (the
// domain is < 4n, so under 4 rounds of walking are expected). Nothing is materialised, so datasets of any size cost
// no memory and any element of any epoch's order is computed directly.
class Permutation {
 public:
  Permutation(int64_t n, uint64_t key) : n_(static_cast<uint64_t>(n)) {
    const int bits = n_ <= 1 ? 0 : std::bit_width(n_ - 1);
    half_ = std::max(1, (bits + 1) / 2);
    mask_ = (uint64_t{1} << half_) - 1;
    for (int r = 0; r < kRounds; ++r) keys_[r] = combine(key, static_cast<uint64_t>(r));
  }
  int64_t operator()(int64_t i) const {
    if (n_ <= 1) return i;
    uint64_t x = static_cast<uint64_t>(i);
    do {
      x = encrypt(x);
    } while (x >= n_);
    return static_cast<int64_t>(x);
  }

 private:
  static constexpr int kRounds = 6;
  uint64_t encrypt(uint64_t x) const {
    uint64_t l = x >> half_, r = x & mask_;
    for (int k = 0; k < kRounds; ++k) {
      const uint64_t t = l ^ (mix64(r ^ keys_[k]) & mask_);
      l = r;
      r = t;
    }
    return (l << half_) | r;
  }
  uint64_t n_;
  int half_ = 1;
  uint64_t mask_ = 1;
  uint64_t keys_[kRounds] = {};
};

}  // namespace

SampleStream::SampleStream(const std::vector<DatasetSpec>& specs, int64_t seq_len, double valid_fraction, uint64_t seed,
                           bool shuffle)
    : seq_len_(seq_len), seed_(seed), shuffle_(shuffle) {
  NEXTRON_CHECK(!specs.empty(), "no training datasets given: pass at least one file made by tools/preprocess.py");
  NEXTRON_CHECK(seq_len > 0, "seq_len must be positive, got ", seq_len);
  NEXTRON_CHECK(std::isfinite(valid_fraction) && valid_fraction >= 0.0 && valid_fraction < 1.0,
                "valid_fraction must be in [0, 1), got ", valid_fraction,
                " (0 holds nothing out; 0.01 holds out 1% of every dataset's samples)");
  double total = 0.0;
  for (const DatasetSpec& s : specs) {
    NEXTRON_CHECK(std::isfinite(s.weight) && s.weight > 0.0, "weight of dataset '", s.path, "' must be positive, got ",
                  s.weight, ": give every dataset a weight > 0 (leave a dataset out instead of weighting it 0)");
    total += s.weight;
  }
  fingerprint_ =
      combine(combine(combine(mix64(seed), static_cast<uint64_t>(seq_len)), std::bit_cast<uint64_t>(valid_fraction)),
              shuffle ? 1 : 0);
  valid_begin_.push_back(0);
  for (const DatasetSpec& s : specs) {
    TokenDataset ds = TokenDataset::open(s.path);
    if (!datasets_.empty()) {
      const TokenDataset& first = datasets_.front();
      NEXTRON_CHECK(ds.tokenizer() == first.tokenizer(), "datasets '", first.path(), "' and '", ds.path(),
                    "' were tokenized with different tokenizers (", first.tokenizer_name(), " ", first.tokenizer(),
                    " vs ", ds.tokenizer_name(), " ", ds.tokenizer(),
                    "): blend only data made with one tokenizer; re-tokenize with tools/preprocess.py --tokenizer");
    }
    const int64_t n = (ds.num_tokens() - 1) / seq_len;
    NEXTRON_CHECK(n >= 1, "token dataset '", ds.path(), "' is too short for seq_len ", seq_len, ": it holds ",
                  ds.num_tokens(), " tokens but one sample needs ", seq_len + 1,
                  "; use a shorter seq_len or add more text to it");
    const int64_t nv =
        valid_fraction > 0.0 ? std::max<int64_t>(1, std::llround(valid_fraction * static_cast<double>(n))) : 0;
    NEXTRON_CHECK(n - nv >= 1, "token dataset '", ds.path(), "' is too short for valid_fraction ", valid_fraction,
                  ": its ", n, " samples of seq_len ", seq_len, " leave no training sample after holding out ", nv,
                  "; use a smaller valid_fraction or more data");
    weights_.push_back(s.weight / total);
    num_samples_.push_back(n);
    num_valid_.push_back(nv);
    valid_begin_.push_back(valid_begin_.back() + nv);
    vocab_size_ = std::max(vocab_size_, ds.vocab_size());
    fingerprint_ = combine(fingerprint_, std::bit_cast<uint64_t>(weights_.back()));
    fingerprint_ = combine(fingerprint_, static_cast<uint64_t>(ds.num_tokens()));
    fingerprint_ = combine(fingerprint_, hash_string(ds.tokenizer()));
    datasets_.push_back(std::move(ds));
  }
  cursor_counts_.assign(datasets_.size(), 0);
  checkpoints_.push_back(cursor_counts_);
}

int64_t SampleStream::num_samples(int d) const { return num_samples_.at(static_cast<size_t>(d)); }
int64_t SampleStream::num_valid_samples(int d) const { return num_valid_.at(static_cast<size_t>(d)); }
int64_t SampleStream::num_train_samples(int d) const { return num_samples(d) - num_valid_samples(d); }

// Split order of dataset d: a seeded permutation of its samples whose first num_valid entries are the validation
// samples and the rest the training samples. Its key depends on the seed, seq_len and the dataset's size only (not on
// its place in the blend or the other datasets, not on valid_fraction), so adding a dataset to the blend never moves
// samples of another one between training and validation, and a larger valid_fraction holds out a superset.
int64_t SampleStream::split_to_sample(int d, int64_t j) const {
  const int64_t n = num_samples(d), nv = num_valid_samples(d);
  if (!shuffle_) return j < nv ? n - nv + j : j - nv;  // validation = the last nv samples
  const uint64_t key = combine(combine(combine(seed_, kSplitTag), static_cast<uint64_t>(seq_len_)),
                               static_cast<uint64_t>(dataset(d).num_tokens()));
  return Permutation(n, key)(j);
}

int64_t SampleStream::train_to_sample(int d, int64_t epoch, int64_t i) const {
  const int64_t nt = num_train_samples(d), nv = num_valid_samples(d);
  if (!shuffle_) return split_to_sample(d, nv + i);
  const uint64_t key =
      combine(combine(combine(seed_, kEpochTag), static_cast<uint64_t>(d)), static_cast<uint64_t>(epoch));
  return split_to_sample(d, nv + Permutation(nt, key)(i));
}

// Blending: global index `index` goes to one dataset given how many samples each got before it (`counts`, updated).
// Tijdeman's chairman-assignment rule: among the datasets whose lag w_d * (index + 1) - counts[d] is at least
// 1 / (2D - 2), take the one whose deadline (counts[d] + sigma) / w_d comes first, sigma = 1 - 1 / (2D - 2). It keeps
// |counts[d] - w_d * n| <= sigma < 1 for every prefix of n samples (Megatron's plain largest-lag rule can exceed 1).
void SampleStream::blend_step(int64_t index, std::vector<int64_t>& counts, int* dataset, int64_t* count) const {
  const int num = num_datasets();
  const double sigma = 1.0 - 1.0 / (2.0 * num - 2.0);
  const double t = static_cast<double>(index + 1);
  int best = -1;
  double best_deadline = 0.0;
  for (int d = 0; d < num; ++d) {
    const double w = weights_[static_cast<size_t>(d)], c = static_cast<double>(counts[static_cast<size_t>(d)]);
    if (w * t - c < 1.0 - sigma - 1e-9) continue;
    const double deadline = (c + sigma) / w;
    if (best < 0 || deadline < best_deadline) {
      best = d;
      best_deadline = deadline;
    }
  }
  NEXTRON_ASSERT(best >= 0);  // the lags sum to 1, so the largest is >= 1 / D >= 1 / (2D - 2)
  *dataset = best;
  *count = counts[static_cast<size_t>(best)]++;
}

SampleRef SampleStream::locate_train(int64_t index) {
  NEXTRON_CHECK(index >= 0, "training sample index must be >= 0, got ", index);
  SampleRef ref;
  int64_t count = index;  // the sample's rank among its dataset's training samples so far
  if (num_datasets() > 1) {
    const size_t k = static_cast<size_t>(index / kCheckpointStride);
    if (index < cursor_ || cursor_ < static_cast<int64_t>(k) * kCheckpointStride) {
      // Jump: replay from the checkpoint at or before index, building any missing checkpoints first.
      while (checkpoints_.size() <= k) {
        std::vector<int64_t> counts = checkpoints_.back();
        const int64_t begin = static_cast<int64_t>(checkpoints_.size() - 1) * kCheckpointStride;
        int d = 0;
        int64_t c = 0;
        for (int64_t g = begin; g < begin + kCheckpointStride; ++g) blend_step(g, counts, &d, &c);
        checkpoints_.push_back(std::move(counts));
      }
      cursor_ = static_cast<int64_t>(k) * kCheckpointStride;
      cursor_counts_ = checkpoints_[k];
    }
    int d = 0;
    for (;;) {
      blend_step(cursor_, cursor_counts_, &d, &count);
      ++cursor_;
      if (cursor_ % kCheckpointStride == 0 && static_cast<size_t>(cursor_ / kCheckpointStride) == checkpoints_.size()) {
        checkpoints_.push_back(cursor_counts_);
      }
      if (cursor_ == index + 1) break;
    }
    ref.dataset = d;
  }
  const int64_t nt = num_train_samples(ref.dataset);
  ref.epoch = count / nt;
  ref.sample = train_to_sample(ref.dataset, ref.epoch, count % nt);
  return ref;
}

SampleRef SampleStream::locate_valid(int64_t index) const {
  NEXTRON_CHECK(index >= 0 && index < num_valid_samples(), "validation sample index ", index, " is outside [0, ",
                num_valid_samples(), ")",
                num_valid_samples() == 0 ? " (valid_fraction is 0: nothing is held out)" : "");
  const auto it = std::upper_bound(valid_begin_.begin(), valid_begin_.end(), index);
  SampleRef ref;
  ref.dataset = static_cast<int>(it - valid_begin_.begin()) - 1;
  ref.sample = split_to_sample(ref.dataset, index - valid_begin_[static_cast<size_t>(ref.dataset)]);
  return ref;
}

void SampleStream::read(const SampleRef& ref, int64_t* out) const {
  NEXTRON_CHECK(
      ref.dataset >= 0 && ref.dataset < num_datasets() && ref.sample >= 0 && ref.sample < num_samples(ref.dataset),
      "sample ", ref.sample, " of dataset ", ref.dataset, " does not exist");
  dataset(ref.dataset).read(ref.sample * seq_len_, seq_len_ + 1, out);
}

void SampleStream::train_sample(int64_t index, int64_t* out) { read(locate_train(index), out); }

void SampleStream::valid_sample(int64_t index, int64_t* out) const { read(locate_valid(index), out); }

void SampleStream::set_position(int64_t position) {
  NEXTRON_CHECK(position >= 0, "data position must be >= 0, got ", position, " (a corrupt checkpoint?)");
  position_ = position;
}

void SampleStream::next(int64_t* out) {
  train_sample(position_, out);
  ++position_;
}

}  // namespace nextron
