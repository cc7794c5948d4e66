// Token datasets (HDF5) and the sample streams: samples against the closed form, determinism, permutations,
// blending fractions, the validation split, resuming, and every bad input as a clear error.
// The files are written here with the HDF5 C API in the format tools/preprocess.py writes (docs/formats.md);
// tools/test_preprocess.py runs DataExternal.ReadsPreprocessedFile on a file preprocess.py made.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"
#include "data/sampler.h"
#include "data/token_dataset.h"

namespace nextron::test {

namespace {

std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("nextron_test_data_" + name + ".h5")).string();
}

// What to write; the defaults make a valid byte-tokenizer file, the knobs break it in one way each.
struct H5Spec {
  std::vector<int64_t> tokens;
  std::vector<int64_t> offsets;
  std::string format = "nextron-tokens";
  int64_t version = 1;
  std::string tokenizer = "byte", tokenizer_name = "byte";
  int64_t vocab = 257, eos = 256;
  int64_t num_docs = -1, num_tokens = -1;  // -1: the true counts
  int64_t crc = -1;                        // -1: the true metadata checksum
  std::set<std::string> omit;              // attributes or datasets left out
  hid_t token_type = H5T_STD_U32LE;
  bool fixed_strings = false;  // fixed-length string attributes instead of h5py's variable-length ones
};

// Documents of the given lengths (EOS included): random byte tokens, each ended by EOS 256.
H5Spec byte_docs(const std::vector<int64_t>& lengths, uint64_t seed) {
  std::mt19937_64 rng(seed);
  H5Spec s;
  s.offsets.push_back(0);
  for (int64_t len : lengths) {
    for (int64_t i = 0; i + 1 < len; ++i) s.tokens.push_back(static_cast<int64_t>(rng() % 256));
    s.tokens.push_back(256);
    s.offsets.push_back(static_cast<int64_t>(s.tokens.size()));
  }
  return s;
}

// One document of `n` tokens.
H5Spec byte_tokens(int64_t n, uint64_t seed) { return byte_docs({n}, seed); }

void write_string_attr(hid_t file, const char* name, const std::string& value, bool fixed) {
  hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_cset(type, H5T_CSET_UTF8);
  hid_t space = H5Screate(H5S_SCALAR);
  if (fixed) {
    H5Tset_size(type, std::max<size_t>(1, value.size()));
    H5Tset_strpad(type, H5T_STR_NULLPAD);
    hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    std::string padded = value;
    padded.resize(std::max<size_t>(1, value.size()), '\0');
    ASSERT_GE(H5Awrite(attr, type, padded.data()), 0);
    H5Aclose(attr);
  } else {
    H5Tset_size(type, H5T_VARIABLE);
    hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    const char* p = value.c_str();
    ASSERT_GE(H5Awrite(attr, type, &p), 0);
    H5Aclose(attr);
  }
  H5Sclose(space);
  H5Tclose(type);
}

void write_int_attr(hid_t file, const char* name, int64_t value) {
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attr = H5Acreate2(file, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(H5Awrite(attr, H5T_NATIVE_INT64, &value), 0);
  H5Aclose(attr);
  H5Sclose(space);
}

void write_1d(hid_t file, const char* name, hid_t file_type, const std::vector<int64_t>& v) {
  const hsize_t n = v.size();
  hid_t space = H5Screate_simple(1, &n, nullptr);
  hid_t ds = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(ds, 0);
  if (n > 0) {
    ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
  }
  H5Dclose(ds);
  H5Sclose(space);
}

std::string write_h5(const std::string& name, const H5Spec& s) {
  const std::string path = tmp_path(name);
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  EXPECT_GE(f, 0) << path;
  auto keep = [&](const char* what) { return s.omit.count(what) == 0; };
  if (keep("tokens")) write_1d(f, "tokens", s.token_type, s.tokens);
  if (keep("doc_offsets")) write_1d(f, "doc_offsets", H5T_STD_I64LE, s.offsets);
  if (keep("format")) write_string_attr(f, "format", s.format, s.fixed_strings);
  if (keep("format_version")) write_int_attr(f, "format_version", s.version);
  if (keep("tokenizer")) write_string_attr(f, "tokenizer", s.tokenizer, s.fixed_strings);
  if (keep("tokenizer_name")) write_string_attr(f, "tokenizer_name", s.tokenizer_name, s.fixed_strings);
  if (keep("vocab_size")) write_int_attr(f, "vocab_size", s.vocab);
  if (keep("eos_id")) write_int_attr(f, "eos_id", s.eos);
  if (keep("num_docs")) {
    write_int_attr(f, "num_docs", s.num_docs >= 0 ? s.num_docs : static_cast<int64_t>(s.offsets.size()) - 1);
  }
  if (keep("num_tokens")) {
    write_int_attr(f, "num_tokens", s.num_tokens >= 0 ? s.num_tokens : static_cast<int64_t>(s.tokens.size()));
  }
  if (keep("metadata_crc32")) {  // over the values as written, so each knob is caught by its own check
    write_int_attr(f, "metadata_crc32",
                   s.crc >= 0
                       ? s.crc
                       : token_metadata_crc32(s.format, s.version, s.tokenizer, s.tokenizer_name, s.vocab, s.eos,
                                              s.num_docs >= 0 ? s.num_docs : static_cast<int64_t>(s.offsets.size()) - 1,
                                              s.num_tokens >= 0 ? s.num_tokens : static_cast<int64_t>(s.tokens.size()),
                                              s.offsets));
  }
  H5Fclose(f);
  return path;
}

// Runs fn, which must throw nextron::Error whose message contains every one of `words`.
template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& words, const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << what << ": no error";
  } catch (const Error& e) {
    for (const std::string& w : words) {
      EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << what << ": '" << w << "' not in: " << e.what();
    }
  }
}

void expect_open_error(const H5Spec& s, const std::vector<std::string>& words, const std::string& what) {
  const std::string path = write_h5("bad", s);
  expect_error([&] { TokenDataset::open(path); }, words, what);
  std::filesystem::remove(path);
}

// Constructs (and drops) a stream: for the error checks.
void open_stream(const std::vector<DatasetSpec>& specs, int64_t seq_len, double valid_fraction, uint64_t seed) {
  SampleStream stream(specs, seq_len, valid_fraction, seed);
}

std::vector<int64_t> slice(const std::vector<int64_t>& v, int64_t begin, int64_t count) {
  return {v.begin() + begin, v.begin() + begin + count};
}

}  // namespace

TEST(TokenDataset, OpensAndReads) {
  for (bool fixed : {false, true}) {
    H5Spec s = byte_docs({5, 1, 17, 9}, 1);
    s.fixed_strings = fixed;
    s.tokenizer = "hf:0123abcd";
    s.tokenizer_name = "my-tokenizer";
    const std::string path = write_h5("open", s);
    const TokenDataset d = TokenDataset::open(path);
    EXPECT_EQ(d.path(), path);
    EXPECT_EQ(d.num_tokens(), 32);
    EXPECT_EQ(d.num_docs(), 4);
    EXPECT_EQ(d.vocab_size(), 257);
    EXPECT_EQ(d.eos_id(), 256);
    EXPECT_EQ(d.tokenizer(), "hf:0123abcd");
    EXPECT_EQ(d.tokenizer_name(), "my-tokenizer");
    std::vector<int64_t> all(32);
    d.read(0, 32, all.data());
    EXPECT_EQ(all, s.tokens);
    std::vector<int64_t> part(7);
    d.read(10, 7, part.data());
    EXPECT_EQ(part, slice(s.tokens, 10, 7));
    d.read(32, 0, part.data());  // empty read at the end is fine
    expect_error([&] { d.read(30, 3, part.data()); }, {"outside", path}, "read past the end");
    expect_error([&] { d.read(-1, 1, part.data()); }, {"outside"}, "negative begin");
    const TokenDataset copy = d;  // copies share the open file
    copy.read(0, 1, part.data());
    EXPECT_EQ(part[0], s.tokens[0]);
    std::filesystem::remove(path);
  }
}

TEST(TokenDataset, BadFilesAreClearErrors) {
  const std::string missing = tmp_path("does_not_exist");
  std::filesystem::remove(missing);
  expect_error([&] { TokenDataset::open(missing); }, {"does not exist", missing, "preprocess.py"}, "missing file");
  expect_error([&] { TokenDataset::open(std::filesystem::temp_directory_path().string()); }, {"not a regular file"},
               "directory");
  const std::string text = tmp_path("text");
  std::ofstream(text) << "hello, I am not an HDF5 file\n";
  expect_error([&] { TokenDataset::open(text); }, {"not an HDF5 file", text}, "text file");

  // A valid file cut short.
  H5Spec good = byte_tokens(4000, 2);
  const std::string trunc = write_h5("trunc", good);
  std::filesystem::resize_file(trunc, std::filesystem::file_size(trunc) / 2);
  expect_error([&] { TokenDataset::open(trunc); }, {trunc}, "truncated file");
  std::filesystem::remove(trunc);
  std::filesystem::remove(text);

  const H5Spec base = byte_docs({4, 6}, 3);
  for (const char* attr :
       {"format", "format_version", "tokenizer", "tokenizer_name", "vocab_size", "eos_id", "num_docs", "num_tokens"}) {
    H5Spec s = base;
    s.omit.insert(attr);
    expect_open_error(s, {"attribute '" + std::string(attr) + "'"}, std::string("missing attribute ") + attr);
  }
  for (const char* ds : {"tokens", "doc_offsets"}) {
    H5Spec s = base;
    s.omit.insert(ds);
    expect_open_error(s, {"dataset '" + std::string(ds) + "'"}, std::string("missing dataset ") + ds);
  }
  H5Spec s = base;
  s.format = "megatron-mmap";
  expect_open_error(s, {"not a nextron token dataset", "megatron-mmap", "nextron-tokens"}, "wrong format string");
  s = base;
  s.version = 2;
  expect_open_error(s, {"format_version 2"}, "future version");
  s = base;
  s.token_type = H5T_STD_I64LE;
  expect_open_error(s, {"uint32", "int64"}, "tokens stored as int64");
  s = base;
  s.vocab = 0;
  expect_open_error(s, {"vocab_size 0"}, "zero vocab");
  s = base;
  s.eos = 257;
  expect_open_error(s, {"eos_id 257"}, "eos outside vocab");
  s = base;
  s.num_tokens = 11;
  expect_open_error(s, {"num_tokens", "10"}, "num_tokens attribute disagrees");
  s = base;
  s.num_docs = 3;
  expect_open_error(s, {"doc_offsets", "num_docs + 1"}, "num_docs attribute disagrees");
  s = base;
  s.offsets = {1, 4, 10};
  expect_open_error(s, {"doc_offsets[0]"}, "offsets not starting at 0");
  s = base;
  s.offsets = {0, 7, 7, 10};
  s.num_docs = 3;
  expect_open_error(s, {"doc_offsets[2]", "does not increase"}, "empty document");
  s = base;
  s.offsets = {0, 4, 9};
  expect_open_error(s, {"doc_offsets ends at 9"}, "offsets not ending at num_tokens");
  s = base;
  s.tokens.back() = 5;
  expect_open_error(s, {"EOS"}, "last token not EOS");
  s = base;
  s.omit.insert("metadata_crc32");
  expect_open_error(s, {"metadata_crc32", "older tools/preprocess.py"}, "no metadata checksum (older preprocess.py)");
  s = base;
  s.crc = 12345;
  expect_open_error(s, {"damaged", "metadata_crc32 says 12345", "preprocess.py"}, "metadata checksum mismatch");
  s = H5Spec{};
  s.offsets = {0};
  expect_open_error(s, {"empty"}, "no documents");

  // Token ids beyond the vocabulary are caught when read.
  s = base;
  s.tokens[2] = 300;
  const std::string path = write_h5("bad_id", s);
  const TokenDataset d = TokenDataset::open(path);
  std::vector<int64_t> out(10);
  expect_error([&] { d.read(0, 10, out.data()); }, {"corrupt", "token id 300", "position 2", "vocab_size 257"},
               "token id out of vocabulary");
  std::filesystem::remove(path);
}

TEST(TokenDataset, CheckVocab) {
  const std::string path = write_h5("vocab", byte_tokens(10, 4));
  const TokenDataset d = TokenDataset::open(path);
  check_vocab(d, 257);
  check_vocab(d, 151936);
  expect_error([&] { check_vocab(d, 256); }, {path, "vocab_size 257", "vocab_size 256", "re-tokenize"},
               "model vocab too small");
  std::filesystem::remove(path);
}

TEST(SampleStream, UnshuffledSamplesMatchClosedForm) {
  const H5Spec s = byte_docs({30, 1, 12, 40}, 5);  // 83 tokens
  const std::string path = write_h5("closed", s);
  constexpr int64_t S = 7;
  SampleStream stream({{path, 1.0}}, S, 0.0, 123, /*shuffle=*/false);
  const int64_t n = (83 - 1) / S;
  ASSERT_EQ(stream.num_samples(0), n);
  ASSERT_EQ(stream.num_train_samples(0), n);
  EXPECT_EQ(stream.num_valid_samples(), 0);
  std::vector<int64_t> out(S + 1);
  for (int64_t i = 0; i < 3 * n; ++i) {  // three epochs, each in file order
    const SampleRef ref = stream.locate_train(i);
    EXPECT_EQ(ref, (SampleRef{0, i % n, i / n}));
    stream.train_sample(i, out.data());
    EXPECT_EQ(out, slice(s.tokens, (i % n) * S, S + 1)) << "sample " << i;
  }
  // Unshuffled validation is the tail of the dataset.
  SampleStream split({{path, 1.0}}, S, 0.25, 123, false);
  EXPECT_EQ(split.num_valid_samples(), 3);  // round(0.25 * 11)
  EXPECT_EQ(split.num_train_samples(0), n - 3);
  for (int64_t v = 0; v < 3; ++v) {
    split.valid_sample(v, out.data());
    EXPECT_EQ(out, slice(s.tokens, (n - 3 + v) * S, S + 1));
  }
  std::filesystem::remove(path);
}

TEST(SampleStream, SeedDeterminesOrder) {
  const H5Spec s = byte_tokens(2001, 6);
  const std::string path = write_h5("seed", s);
  constexpr int64_t S = 8;
  SampleStream a({{path, 1.0}}, S, 0.1, 42), b({{path, 1.0}}, S, 0.1, 42), c({{path, 1.0}}, S, 0.1, 43);
  std::vector<int64_t> oa(S + 1), ob(S + 1);
  int differ = 0;
  for (int64_t i = 0; i < 500; ++i) {
    EXPECT_EQ(a.locate_train(i), b.locate_train(i));
    a.train_sample(i, oa.data());
    b.train_sample(i, ob.data());
    EXPECT_EQ(oa, ob);
    const int64_t sample = a.locate_train(i).sample;
    EXPECT_EQ(oa, slice(s.tokens, sample * S, S + 1));  // shuffled samples are still the closed-form ones
    differ += a.locate_train(i) != c.locate_train(i);
  }
  EXPECT_GT(differ, 400);  // another seed: another order
  for (int64_t v = 0; v < a.num_valid_samples(); ++v) EXPECT_EQ(a.locate_valid(v), b.locate_valid(v));
  // Shuffled really means shuffled: the first epoch is not in file order.
  int in_order = 0;
  for (int64_t i = 1; i < 200; ++i) in_order += a.locate_train(i).sample == a.locate_train(i - 1).sample + 1;
  EXPECT_LT(in_order, 10);
  std::filesystem::remove(path);
}

TEST(SampleStream, EpochsArePermutations) {
  const std::string path = write_h5("perm", byte_tokens(1001, 7));
  SampleStream stream({{path, 1.0}}, 4, 0.1, 9);  // 250 samples: 25 valid, 225 train
  const int64_t nt = stream.num_train_samples(0);
  ASSERT_EQ(nt, 225);
  std::set<int64_t> valid;
  for (int64_t v = 0; v < stream.num_valid_samples(); ++v) valid.insert(stream.locate_valid(v).sample);
  EXPECT_EQ(static_cast<int64_t>(valid.size()), 25);
  std::vector<int64_t> first_epoch;
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::set<int64_t> seen;
    std::vector<int64_t> order;
    for (int64_t i = 0; i < nt; ++i) {
      const SampleRef ref = stream.locate_train(epoch * nt + i);
      EXPECT_EQ(ref.epoch, epoch);
      EXPECT_TRUE(ref.sample >= 0 && ref.sample < 250);
      EXPECT_EQ(valid.count(ref.sample), 0u) << "training sample " << ref.sample << " is a validation sample";
      seen.insert(ref.sample);
      order.push_back(ref.sample);
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), nt) << "epoch " << epoch << " repeats samples";
    if (epoch == 0) first_epoch = order;
    if (epoch > 0) {
      EXPECT_NE(order, first_epoch) << "epoch " << epoch << " reuses epoch 0's order";
    }
  }
  std::filesystem::remove(path);
}

TEST(SampleStream, BlendingMatchesWeights) {
  // Datasets of very different sizes (so the small ones wrap through many epochs) and uneven weights.
  const std::string p0 = write_h5("blend0", byte_tokens(4001, 10));
  const std::string p1 = write_h5("blend1", byte_tokens(301, 11));
  const std::string p2 = write_h5("blend2", byte_tokens(97, 12));
  const std::vector<double> raw = {5.0, 3.0, 1.5};
  SampleStream stream({{p0, raw[0]}, {p1, raw[1]}, {p2, raw[2]}}, 8, 0.0, 77);
  const double total = raw[0] + raw[1] + raw[2];
  for (int d = 0; d < 3; ++d) EXPECT_DOUBLE_EQ(stream.weight(d), raw[static_cast<size_t>(d)] / total);
  constexpr int64_t N = 5000;
  std::vector<int64_t> counts(3, 0);
  std::vector<std::map<int64_t, std::set<int64_t>>> per_epoch(3);
  for (int64_t n = 1; n <= N; ++n) {
    const SampleRef ref = stream.locate_train(n - 1);
    const size_t d = static_cast<size_t>(ref.dataset);
    // The dataset's own counter runs through its epochs in order.
    EXPECT_EQ(ref.epoch, counts[d] / stream.num_train_samples(ref.dataset));
    per_epoch[d][ref.epoch].insert(ref.sample);
    ++counts[d];
    for (size_t k = 0; k < 3; ++k) {
      // Realised fraction within 1/n of the weight, for every prefix of the stream.
      ASSERT_LE(std::abs(static_cast<double>(counts[k]) - stream.weight(static_cast<int>(k)) * n), 1.0)
          << "dataset " << k << " after " << n << " samples";
    }
  }
  for (int d = 0; d < 3; ++d) {  // every completed epoch of every dataset is a permutation
    for (const auto& [epoch, samples] : per_epoch[static_cast<size_t>(d)]) {
      if ((epoch + 1) * stream.num_train_samples(d) <= counts[static_cast<size_t>(d)]) {
        EXPECT_EQ(static_cast<int64_t>(samples.size()), stream.num_train_samples(d)) << d << " " << epoch;
      }
    }
  }
  EXPECT_GT(per_epoch[2].size(), 50u);  // the small dataset (12 samples) wrapped many times
  for (const auto& p : {p0, p1, p2}) std::filesystem::remove(p);
}

TEST(SampleStream, ValidationIsDisjointFromTraining) {
  const H5Spec s0 = byte_tokens(1201, 20), s1 = byte_tokens(801, 21);
  const std::string p0 = write_h5("valid0", s0), p1 = write_h5("valid1", s1);
  constexpr int64_t S = 4;
  SampleStream stream({{p0, 2.0}, {p1, 1.0}}, S, 0.05, 5);
  EXPECT_EQ(stream.num_valid_samples(0), 15);  // round(0.05 * 300)
  EXPECT_EQ(stream.num_valid_samples(1), 10);  // round(0.05 * 200)
  EXPECT_EQ(stream.num_valid_samples(), 25);
  const std::vector<const H5Spec*> specs = {&s0, &s1};
  std::vector<std::set<int64_t>> valid(2), train(2);
  std::vector<int64_t> out(S + 1);
  for (int64_t v = 0; v < stream.num_valid_samples(); ++v) {
    const SampleRef ref = stream.locate_valid(v);
    EXPECT_EQ(ref.dataset, v < 15 ? 0 : 1);  // dataset 0's first
    valid[static_cast<size_t>(ref.dataset)].insert(ref.sample);
    stream.valid_sample(v, out.data());
    EXPECT_EQ(out, slice(specs[static_cast<size_t>(ref.dataset)]->tokens, ref.sample * S, S + 1));
  }
  for (int64_t i = 0; i < 2000; ++i) {
    const SampleRef ref = stream.locate_train(i);
    train[static_cast<size_t>(ref.dataset)].insert(ref.sample);
  }
  for (size_t d = 0; d < 2; ++d) {
    EXPECT_EQ(static_cast<int64_t>(valid[d].size()), stream.num_valid_samples(static_cast<int>(d)));
    EXPECT_EQ(static_cast<int64_t>(train[d].size()), stream.num_train_samples(static_cast<int>(d)));
    for (int64_t x : valid[d]) EXPECT_EQ(train[d].count(x), 0u) << "dataset " << d << " sample " << x;
  }
  expect_error([&] { stream.locate_valid(25); }, {"outside [0, 25)"}, "validation index past the end");
  // The split depends on the dataset alone: listing it with another partner and weight keeps its held-out set,
  // and a larger valid_fraction holds out a superset.
  SampleStream alone({{p1, 1.0}}, S, 0.05, 5), more({{p1, 1.0}}, S, 0.1, 5);
  std::set<int64_t> alone_valid, more_valid;
  for (int64_t v = 0; v < alone.num_valid_samples(); ++v) alone_valid.insert(alone.locate_valid(v).sample);
  for (int64_t v = 0; v < more.num_valid_samples(); ++v) more_valid.insert(more.locate_valid(v).sample);
  EXPECT_EQ(alone_valid, valid[1]);
  for (int64_t x : alone_valid) EXPECT_EQ(more_valid.count(x), 1u);
  std::filesystem::remove(p0);
  std::filesystem::remove(p1);
}

TEST(SampleStream, ResumesAtPosition) {
  const std::string p0 = write_h5("resume0", byte_tokens(3001, 30)), p1 = write_h5("resume1", byte_tokens(501, 31));
  const std::vector<DatasetSpec> specs = {{p0, 0.7}, {p1, 0.3}};
  constexpr int64_t S = 6;
  SampleStream first(specs, S, 0.02, 11);
  std::vector<int64_t> out(S + 1);
  constexpr int64_t kStop = 37000;  // past two blending checkpoints
  std::vector<SampleRef> expected;
  for (int64_t i = 0; i < kStop + 50; ++i) expected.push_back(first.locate_train(i));
  for (int64_t i = 0; i < 5; ++i) first.next(out.data());
  EXPECT_EQ(first.position(), 5);

  SampleStream resumed(specs, S, 0.02, 11);
  EXPECT_EQ(resumed.fingerprint(), first.fingerprint());
  resumed.set_position(kStop);
  std::vector<int64_t> want(S + 1);
  for (int64_t i = kStop; i < kStop + 50; ++i) {
    resumed.next(out.data());
    first.read(expected[static_cast<size_t>(i)], want.data());
    EXPECT_EQ(out, want) << "sample " << i;
  }
  EXPECT_EQ(resumed.position(), kStop + 50);
  // Random access in any order agrees with the sequential pass (a DP rank reading every R-th index).
  SampleStream jumpy(specs, S, 0.02, 11);
  for (int64_t i : {kStop + 3, int64_t{17}, int64_t{20000}, int64_t{16383}, int64_t{16384}, kStop - 1, int64_t{0}}) {
    EXPECT_EQ(jumpy.locate_train(i), expected[static_cast<size_t>(i)]) << "index " << i;
  }
  for (int64_t i = 5; i < kStop; i += 997) EXPECT_EQ(jumpy.locate_train(i), expected[static_cast<size_t>(i)]);
  expect_error([&] { resumed.set_position(-1); }, {"position"}, "negative position");
  std::filesystem::remove(p0);
  std::filesystem::remove(p1);
}

TEST(SampleStream, FingerprintCoversTheConfiguration) {
  const std::string p0 = write_h5("fp0", byte_tokens(301, 40)), p1 = write_h5("fp1", byte_tokens(302, 41));
  const uint64_t base = SampleStream({{p0, 1.0}, {p1, 1.0}}, 4, 0.1, 1).fingerprint();
  EXPECT_EQ(SampleStream({{p0, 2.0}, {p1, 2.0}}, 4, 0.1, 1).fingerprint(), base);  // same normalised weights
  EXPECT_NE(SampleStream({{p0, 1.0}, {p1, 2.0}}, 4, 0.1, 1).fingerprint(), base);
  EXPECT_NE(SampleStream({{p0, 1.0}, {p1, 1.0}}, 5, 0.1, 1).fingerprint(), base);
  EXPECT_NE(SampleStream({{p0, 1.0}, {p1, 1.0}}, 4, 0.2, 1).fingerprint(), base);
  EXPECT_NE(SampleStream({{p0, 1.0}, {p1, 1.0}}, 4, 0.1, 2).fingerprint(), base);
  EXPECT_NE(SampleStream({{p0, 1.0}, {p1, 1.0}}, 4, 0.1, 1, false).fingerprint(), base);
  EXPECT_NE(SampleStream({{p1, 1.0}, {p0, 1.0}}, 4, 0.1, 1).fingerprint(), base);
  std::filesystem::remove(p0);
  std::filesystem::remove(p1);
}

TEST(SampleStream, BadConfigurationsAreClearErrors) {
  const std::string path = write_h5("cfg", byte_tokens(101, 50));
  H5Spec other = byte_tokens(101, 51);
  other.tokenizer = "hf:feedbeef";
  other.tokenizer_name = "other";
  const std::string other_path = write_h5("cfg_other", other);
  const std::string missing = tmp_path("cfg_missing");
  std::filesystem::remove(missing);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect_error([&] { open_stream({}, 4, 0.0, 1); }, {"no training datasets"}, "no datasets");
  expect_error([&] { open_stream({{path, 1.0}}, 0, 0.0, 1); }, {"seq_len", "positive"}, "seq_len 0");
  expect_error([&] { open_stream({{path, 1.0}}, -3, 0.0, 1); }, {"seq_len"}, "negative seq_len");
  for (double w : {0.0, -1.0, nan}) {
    expect_error(
        [&] {
          open_stream({{path, 1.0}, {path, w}}, 4, 0.0, 1);
        },
        {"weight", path, "positive"}, "weight " + std::to_string(w));
  }
  for (double f : {1.0, -0.1, 1.5, nan}) {
    expect_error(
        [&] {
          open_stream({{path, 1.0}}, 4, f, 1);
        },
        {"valid_fraction", "[0, 1)"}, "valid_fraction " + std::to_string(f));
  }
  expect_error(
      [&] {
        open_stream({{path, 1.0}}, 101, 0.0, 1);
      },
      {"too short", "seq_len 101", "101 tokens", path}, "dataset shorter than one sample");
  open_stream({{path, 1.0}}, 100, 0.0, 1);  // 101 tokens: exactly one sample of 100 + 1
  expect_error(
      [&] {
        open_stream({{path, 1.0}}, 100, 0.01, 1);
      },
      {"too short", "valid_fraction"}, "split leaves no training sample");
  expect_error(
      [&] {
        open_stream({{path, 1.0}, {other_path, 1.0}}, 4, 0.0, 1);
      },
      {"different tokenizers", path, other_path}, "mixed tokenizers");
  expect_error(
      [&] {
        open_stream({{path, 1.0}, {missing, 1.0}}, 4, 0.0, 1);
      },
      {"does not exist", missing}, "missing dataset file");
  SampleStream ok({{path, 1.0}}, 4, 0.0, 1);
  std::vector<int64_t> out(5);
  expect_error([&] { ok.locate_train(-1); }, {"index"}, "negative index");
  expect_error([&] { ok.valid_sample(0, out.data()); }, {"nothing is held out"}, "validation without a split");
  std::filesystem::remove(path);
  std::filesystem::remove(other_path);
}

// A file written by tools/preprocess.py (h5py): tools/test_preprocess.py sets NEXTRON_TEST_DATASET and the values
// it expects; skipped otherwise.
TEST(DataExternal, ReadsPreprocessedFile) {
  const char* path = std::getenv("NEXTRON_TEST_DATASET");
  if (path == nullptr) GTEST_SKIP() << "NEXTRON_TEST_DATASET not set (tools/test_preprocess.py sets it)";
  auto env_int = [](const char* name) {
    const char* v = std::getenv(name);
    EXPECT_NE(v, nullptr) << name;
    return v != nullptr ? std::stoll(v) : int64_t{-1};
  };
  const TokenDataset d = TokenDataset::open(path);
  EXPECT_EQ(d.num_tokens(), env_int("NEXTRON_TEST_DATASET_TOKENS"));
  EXPECT_EQ(d.num_docs(), env_int("NEXTRON_TEST_DATASET_DOCS"));
  EXPECT_EQ(d.vocab_size(), env_int("NEXTRON_TEST_DATASET_VOCAB"));
  EXPECT_EQ(d.eos_id(), env_int("NEXTRON_TEST_DATASET_EOS"));
  const char* tok = std::getenv("NEXTRON_TEST_DATASET_TOKENIZER");
  EXPECT_EQ(d.tokenizer(), tok != nullptr ? tok : "");
  std::vector<int64_t> all(static_cast<size_t>(d.num_tokens()));
  d.read(0, d.num_tokens(), all.data());
  int64_t sum = 0, weighted = 0;  // weighted: sum of (i + 1) * token mod 2^31 - 1 catches order errors
  constexpr int64_t kMod = (int64_t{1} << 31) - 1;
  for (size_t i = 0; i < all.size(); ++i) {
    sum += all[i];
    weighted = (weighted + (static_cast<int64_t>(i + 1) % kMod) * all[i]) % kMod;
  }
  EXPECT_EQ(sum, env_int("NEXTRON_TEST_DATASET_SUM"));
  EXPECT_EQ(weighted, env_int("NEXTRON_TEST_DATASET_WEIGHTED"));
  // And a sample stream over it.
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>(16, (d.num_tokens() - 1) / 2));
  SampleStream stream({{path, 1.0}}, S, 0.0, 3);
  std::vector<int64_t> out(static_cast<size_t>(S + 1));
  for (int64_t i = 0; i < stream.num_train_samples(0); ++i) {
    const SampleRef ref = stream.locate_train(i);
    stream.read(ref, out.data());
    EXPECT_EQ(out, slice(all, ref.sample * S, S + 1));
  }
}

}  // namespace nextron::test
