// One tokenized dataset file (HDF5, written by tools/preprocess.py; the format is in docs/formats.md):
// `tokens` (uint32, documents back to back, each followed by the EOS id), `doc_offsets` (int64, num_docs + 1 start
// offsets into `tokens`) and root attributes naming the format, the tokenizer and the sizes.
//
// Opening validates the whole header (format string and version, attributes, dataset types and shapes against the
// file's size, doc_offsets against tokens, the metadata checksum), so a bad file fails at startup with a message
// naming the file, not in the middle of training.
// Token ids are checked against vocab_size as they are read.
//
// The serial HDF5 library is not thread-safe: use a TokenDataset (and every copy of it, which shares the open
// file) from one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace nextron {

inline constexpr const char* kTokenDatasetFormat = "nextron-tokens";
inline constexpr int64_t kTokenDatasetFormatVersion = 1;

class TokenDataset {
 public:
  // Opens and validates `path`; throws nextron::Error naming the file and the problem.
  static TokenDataset open(const std::string& path);

  const std::string& path() const { return path_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_docs() const { return num_docs_; }
  int64_t vocab_size() const { return vocab_size_; }
  int64_t eos_id() const { return eos_id_; }
  // Tokenizer identity ("byte" or "hf:<sha256 of tokenizer.json>") and its human-readable name.
  const std::string& tokenizer() const { return tokenizer_; }
  const std::string& tokenizer_name() const { return tokenizer_name_; }

  // Copies tokens [begin, begin + count) into out; the range must lie inside the file.
  void read(int64_t begin, int64_t count, int64_t* out) const;

 private:
  struct File;
  std::shared_ptr<File> file_;
  std::string path_, tokenizer_, tokenizer_name_;
  int64_t num_tokens_ = 0, num_docs_ = 0, vocab_size_ = 0, eos_id_ = 0;
};

// The metadata checksum stored in attribute `metadata_crc32`: CRC-32 (zlib's) of the attributes and doc_offsets,
// serialised as docs/formats.md describes.
uint32_t token_metadata_crc32(const std::string& format, int64_t format_version, const std::string& tokenizer,
                              const std::string& tokenizer_name, int64_t vocab_size, int64_t eos_id, int64_t num_docs,
                              int64_t num_tokens, const std::vector<int64_t>& doc_offsets);

// Writes `path` (replacing it) in the format tools/preprocess.py writes, for C++ tools and tests; `doc_offsets` holds
// num_docs + 1 offsets into `tokens`. Not atomic: write to a temporary name and rename when that matters.
void write_token_dataset(const std::string& path, const std::vector<uint32_t>& tokens,
                         const std::vector<int64_t>& doc_offsets, const std::string& tokenizer,
                         const std::string& tokenizer_name, int64_t vocab_size, int64_t eos_id);

// Throws when the dataset's token ids may not fit the model (vocab_size > model_vocab); the message names both
// numbers, the file and the fix.
void check_vocab(const TokenDataset& dataset, int64_t model_vocab);

}  // namespace nextron
