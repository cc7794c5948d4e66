#include "data/token_dataset.h"

#include <hdf5.h>
#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/hdf5.h"

namespace nextron {

namespace {

constexpr const char* kRemake = "re-create it with tools/preprocess.py";
constexpr const char* kChecksumAttr = "metadata_crc32";
// Longest string attribute read: they hold names and hashes, so anything longer is damage, not data.
constexpr size_t kMaxStringAttr = size_t{1} << 16;

// zlib's CRC-32 (so Python's zlib.crc32 gives the same value), fed int64 values as 8 little-endian bytes each.
class Crc32 {
 public:
  void update(const void* data, size_t n) {
    const auto* p = static_cast<const Bytef*>(data);
    while (n > 0) {  // zlib takes uInt lengths
      const uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
      crc_ = ::crc32(crc_, p, chunk);
      p += chunk;
      n -= chunk;
    }
  }
  void update_i64(const int64_t* v, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      unsigned char b[8];
      for (int k = 0; k < 8; ++k) b[k] = static_cast<unsigned char>(static_cast<uint64_t>(v[i]) >> (8 * k));
      update(b, 8);
    }
  }
  uint32_t value() const { return static_cast<uint32_t>(crc_); }

 private:
  uLong crc_ = ::crc32(0L, Z_NULL, 0);
};

// The attributes' part of the metadata checksum: one line per value (docs/formats.md).
std::string checksum_header(const std::string& format, int64_t format_version, const std::string& tokenizer,
                            const std::string& tokenizer_name, int64_t vocab_size, int64_t eos_id, int64_t num_docs,
                            int64_t num_tokens) {
  return detail::concat(format, "\n", format_version, "\n", tokenizer, "\n", tokenizer_name, "\n", vocab_size, "\n",
                        eos_id, "\n", num_docs, "\n", num_tokens, "\n");
}

std::string describe_type(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return (H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bits);
    case H5T_FLOAT:
      return "float" + std::to_string(bits);
    case H5T_STRING:
      return "string";
    default:
      return "a non-numeric type";
  }
}

H5Id open_attr(hid_t file, const std::string& path, const char* name) {
  NEXTRON_CHECK(H5Aexists(file, name) > 0, "'", path, "' has no attribute '", name,
                "': it is not a nextron token dataset or it is damaged; ", kRemake);
  H5Id attr(H5Aopen(file, name, H5P_DEFAULT), H5Aclose);
  NEXTRON_CHECK(attr.valid(), "cannot open attribute '", name, "' of '", path, "' (file damaged?); ", kRemake);
  H5Id space(H5Aget_space(attr.get()), H5Sclose);
  NEXTRON_CHECK(space.valid() && H5Sget_simple_extent_npoints(space.get()) == 1, "attribute '", name, "' of '", path,
                "' must be a single value; ", kRemake);
  return attr;
}

std::string read_string_attr(hid_t file, const std::string& path, const char* name) {
  H5Id attr = open_attr(file, path, name);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  NEXTRON_CHECK(H5Tget_class(type.get()) == H5T_STRING, "attribute '", name, "' of '", path,
                "' must be a string, found ", describe_type(type.get()), "; ", kRemake);
  if (H5Tis_variable_str(type.get()) > 0) {  // what h5py writes for a Python str
    H5Id mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), H5T_VARIABLE);
    H5Tset_cset(mem.get(), H5Tget_cset(type.get()));
    char* s = nullptr;
    NEXTRON_CHECK(H5Aread(attr.get(), mem.get(), &s) >= 0, "cannot read attribute '", name, "' of '", path, "'; ",
                  kRemake);
    std::string out = s != nullptr ? s : "";
    H5free_memory(s);
    NEXTRON_CHECK(out.size() <= kMaxStringAttr, "attribute '", name, "' of '", path, "' holds ", out.size(),
                  " bytes, more than a nextron token dataset stores (file damaged?); ", kRemake);
    return out;
  }
  const size_t size = H5Tget_size(type.get());
  NEXTRON_CHECK(size > 0 && size <= kMaxStringAttr, "attribute '", name, "' of '", path, "' claims ", size,
                " bytes, more than a nextron token dataset stores (file damaged?); ", kRemake);
  std::vector<char> buf(size + 1, '\0');  // fixed length, NUL- or space-padded
  NEXTRON_CHECK(H5Aread(attr.get(), type.get(), buf.data()) >= 0, "cannot read attribute '", name, "' of '", path,
                "'; ", kRemake);
  std::string out(buf.data());
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

int64_t read_int_attr(hid_t file, const std::string& path, const char* name) {
  H5Id attr = open_attr(file, path, name);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  NEXTRON_CHECK(H5Tget_class(type.get()) == H5T_INTEGER, "attribute '", name, "' of '", path,
                "' must be an integer, found ", describe_type(type.get()), "; ", kRemake);
  int64_t v = 0;
  NEXTRON_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, &v) >= 0, "cannot read attribute '", name, "' of '", path,
                "' as int64; ", kRemake);
  return v;
}

// Opens 1-D integer dataset `name` and returns it with its length, which must fit in the file (`file_bytes`) at
// its element size, so a damaged extent cannot make the caller allocate or loop without bound.
std::pair<H5Id, int64_t> open_1d(hid_t file, const std::string& path, const char* name, uint64_t file_bytes) {
  NEXTRON_CHECK(H5Lexists(file, name, H5P_DEFAULT) > 0, "'", path, "' has no dataset '", name,
                "': it is not a nextron token dataset or it is damaged; ", kRemake);
  H5Id ds(H5Dopen2(file, name, H5P_DEFAULT), H5Dclose);
  NEXTRON_CHECK(ds.valid(), "'", name, "' in '", path, "' is not a readable dataset; ", kRemake);
  H5Id space(H5Dget_space(ds.get()), H5Sclose);
  NEXTRON_CHECK(space.valid() && H5Sget_simple_extent_ndims(space.get()) == 1, "dataset '", name, "' of '", path,
                "' must be 1-D; ", kRemake);
  H5Id type(H5Dget_type(ds.get()), H5Tclose);
  const uint64_t elem_bytes = std::max<size_t>(1, type.valid() ? H5Tget_size(type.get()) : 1);
  hsize_t n = 0;
  NEXTRON_CHECK(H5Sget_simple_extent_dims(space.get(), &n, nullptr) == 1 && n <= file_bytes / elem_bytes, "dataset '",
                name, "' of '", path, "' claims ", n, " elements, more than its ", file_bytes,
                " bytes can hold (file truncated or damaged?); ", kRemake);
  return {std::move(ds), static_cast<int64_t>(n)};
}

// Reads elements [begin, begin + count) of a 1-D integer dataset, converted to int64.
bool read_range(hid_t ds, int64_t begin, int64_t count, int64_t* out) {
  if (count == 0) return true;
  H5Id fspace(H5Dget_space(ds), H5Sclose);
  if (!fspace.valid()) return false;
  const hsize_t start = static_cast<hsize_t>(begin), cnt = static_cast<hsize_t>(count);
  if (H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &cnt, nullptr) < 0) return false;
  H5Id mspace(H5Screate_simple(1, &cnt, nullptr), H5Sclose);
  if (!mspace.valid()) return false;
  return H5Dread(ds, H5T_NATIVE_INT64, mspace.get(), fspace.get(), H5P_DEFAULT, out) >= 0;
}

}  // namespace

struct TokenDataset::File {
  H5Id file;    // declared first: closed last
  H5Id tokens;  // the `tokens` dataset
};

TokenDataset TokenDataset::open(const std::string& path) {
  QuietHdf5 quiet;
  std::error_code ec;
  NEXTRON_CHECK(std::filesystem::exists(path, ec), "token dataset '", path,
                "' does not exist: check the path, or make it from text with tools/preprocess.py");
  NEXTRON_CHECK(std::filesystem::is_regular_file(path, ec), "token dataset '", path,
                "' is not a regular file: pass the .h5 file written by tools/preprocess.py");
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is_hdf5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
#endif
  NEXTRON_CHECK(is_hdf5 > 0, "token dataset '", path,
                "' is not an HDF5 file (corrupt, truncated or another format): make it with tools/preprocess.py");
  TokenDataset d;
  d.path_ = path;
  d.file_ = std::make_shared<File>();
  d.file_->file = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  NEXTRON_CHECK(d.file_->file.valid(), "cannot open token dataset '", path, "' (HDF5 file damaged or truncated?); ",
                kRemake);
  const hid_t f = d.file_->file.get();
  const uint64_t file_bytes = std::filesystem::file_size(path, ec);
  NEXTRON_CHECK(!ec, "cannot read the size of token dataset '", path, "': ", ec.message());

  // Checked first: files without it come from an older preprocess.py, whose format (HDF5's 1.8-compatible layout,
  // no metadata checksums) lets damage go unnoticed, so they are refused before anything else of them is parsed.
  NEXTRON_CHECK(H5Aexists(f, kChecksumAttr) > 0, "token dataset '", path, "' has no ", kChecksumAttr,
                " attribute: it was written by an older tools/preprocess.py (or is damaged), whose files carry no ",
                "metadata checksum; re-create it with the current tools/preprocess.py");
  const int64_t stored_crc = read_int_attr(f, path, kChecksumAttr);

  const std::string format = read_string_attr(f, path, "format");
  NEXTRON_CHECK(format == kTokenDatasetFormat, "'", path, "' is not a nextron token dataset: attribute format is '",
                format, "', expected '", kTokenDatasetFormat, "'; make it with tools/preprocess.py");
  const int64_t version = read_int_attr(f, path, "format_version");
  NEXTRON_CHECK(version == kTokenDatasetFormatVersion, "'", path, "' has format_version ", version,
                " but this nextron reads version ", kTokenDatasetFormatVersion, "; ", kRemake);
  d.tokenizer_ = read_string_attr(f, path, "tokenizer");
  d.tokenizer_name_ = read_string_attr(f, path, "tokenizer_name");
  NEXTRON_CHECK(!d.tokenizer_.empty(), "'", path, "' has an empty tokenizer attribute; ", kRemake);
  d.vocab_size_ = read_int_attr(f, path, "vocab_size");
  d.eos_id_ = read_int_attr(f, path, "eos_id");
  d.num_docs_ = read_int_attr(f, path, "num_docs");
  d.num_tokens_ = read_int_attr(f, path, "num_tokens");
  NEXTRON_CHECK(d.vocab_size_ > 0 && d.vocab_size_ <= (int64_t{1} << 32), "'", path, "' has vocab_size ", d.vocab_size_,
                ", outside [1, 2^32]; ", kRemake);
  NEXTRON_CHECK(d.eos_id_ >= 0 && d.eos_id_ < d.vocab_size_, "'", path, "' has eos_id ", d.eos_id_,
                " outside the vocabulary [0, ", d.vocab_size_, "); ", kRemake);
  NEXTRON_CHECK(d.num_docs_ >= 0 && d.num_tokens_ >= 0, "'", path, "' has negative num_docs (", d.num_docs_,
                ") or num_tokens (", d.num_tokens_, "); ", kRemake);
  NEXTRON_CHECK(d.num_tokens_ > 0 && d.num_docs_ > 0, "token dataset '", path,
                "' is empty (no documents): preprocess some text into it with tools/preprocess.py");

  auto [tokens, num_tokens] = open_1d(f, path, "tokens", file_bytes);
  {
    H5Id type(H5Dget_type(tokens.get()), H5Tclose);
    NEXTRON_CHECK(H5Tget_class(type.get()) == H5T_INTEGER && H5Tget_sign(type.get()) == H5T_SGN_NONE &&
                      H5Tget_size(type.get()) == 4,
                  "dataset 'tokens' of '", path, "' must be uint32, found ", describe_type(type.get()), "; ", kRemake);
  }
  NEXTRON_CHECK(num_tokens == d.num_tokens_, "'", path, "' is inconsistent: dataset 'tokens' holds ", num_tokens,
                " tokens but attribute num_tokens says ", d.num_tokens_, "; ", kRemake);

  auto [offsets, num_offsets] = open_1d(f, path, "doc_offsets", file_bytes);
  {
    H5Id type(H5Dget_type(offsets.get()), H5Tclose);
    NEXTRON_CHECK(H5Tget_class(type.get()) == H5T_INTEGER, "dataset 'doc_offsets' of '", path,
                  "' must be int64, found ", describe_type(type.get()), "; ", kRemake);
  }
  NEXTRON_CHECK(num_offsets == d.num_docs_ + 1, "'", path, "' is inconsistent: doc_offsets has ", num_offsets,
                " entries, expected num_docs + 1 = ", d.num_docs_ + 1, "; ", kRemake);
  // doc_offsets must run from 0 to num_tokens, strictly increasing (every document holds at least its EOS).
  // Checked in blocks so a file with very many documents does not need them all in memory.
  constexpr int64_t kBlock = int64_t{1} << 20;
  Crc32 crc;
  const std::string header = checksum_header(format, version, d.tokenizer_, d.tokenizer_name_, d.vocab_size_, d.eos_id_,
                                             d.num_docs_, d.num_tokens_);
  crc.update(header.data(), header.size());
  std::vector<int64_t> block;
  int64_t prev = -1;
  for (int64_t b = 0; b < num_offsets; b += kBlock) {
    const int64_t n = std::min(kBlock, num_offsets - b);
    block.resize(static_cast<size_t>(n));
    NEXTRON_CHECK(read_range(offsets.get(), b, n, block.data()), "cannot read doc_offsets of '", path,
                  "' (file truncated or damaged?); ", kRemake);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = block[static_cast<size_t>(i)];
      NEXTRON_CHECK(b + i > 0 || v == 0, "'", path, "' is inconsistent: doc_offsets[0] is ", v, ", expected 0; ",
                    kRemake);
      NEXTRON_CHECK(v > prev, "'", path, "' is inconsistent: doc_offsets[", b + i, "] = ", v,
                    " does not increase past doc_offsets[", b + i - 1, "] = ", prev, "; ", kRemake);
      prev = v;
    }
    crc.update_i64(block.data(), block.size());
  }
  NEXTRON_CHECK(prev == d.num_tokens_, "'", path, "' is inconsistent: doc_offsets ends at ", prev, " but tokens holds ",
                d.num_tokens_, "; ", kRemake);
  NEXTRON_CHECK(stored_crc == static_cast<int64_t>(crc.value()), "token dataset '", path, "' is damaged: its ",
                "metadata (attributes and doc_offsets) has CRC-32 ", crc.value(), " but ", kChecksumAttr, " says ",
                stored_crc, "; ", kRemake);
  d.file_->tokens = std::move(tokens);

  int64_t last = -1;
  NEXTRON_CHECK(read_range(d.file_->tokens.get(), d.num_tokens_ - 1, 1, &last), "cannot read tokens of '", path,
                "' (file truncated or damaged?); ", kRemake);
  NEXTRON_CHECK(last == d.eos_id_, "'", path, "' is inconsistent: its last token is ", last, ", not the EOS id ",
                d.eos_id_, " that ends every document; ", kRemake);
  return d;
}

void TokenDataset::read(int64_t begin, int64_t count, int64_t* out) const {
  NEXTRON_CHECK(file_ != nullptr, "TokenDataset::read on a dataset that was never opened");
  NEXTRON_CHECK(begin >= 0 && count >= 0 && count <= num_tokens_ - begin, "token range [", begin, ", ", begin + count,
                ") lies outside '", path_, "' (", num_tokens_, " tokens)");
  QuietHdf5 quiet;
  NEXTRON_CHECK(read_range(file_->tokens.get(), begin, count, out), "reading tokens [", begin, ", ", begin + count,
                ") from '", path_, "' failed (file truncated or damaged?); ", kRemake);
  for (int64_t i = 0; i < count; ++i) {
    NEXTRON_CHECK(out[i] >= 0 && out[i] < vocab_size_, "'", path_, "' is corrupt: token id ", out[i], " at position ",
                  begin + i, " is not below its vocab_size ", vocab_size_, "; ", kRemake);
  }
}

uint32_t token_metadata_crc32(const std::string& format, int64_t format_version, const std::string& tokenizer,
                              const std::string& tokenizer_name, int64_t vocab_size, int64_t eos_id, int64_t num_docs,
                              int64_t num_tokens, const std::vector<int64_t>& doc_offsets) {
  Crc32 crc;
  const std::string header =
      checksum_header(format, format_version, tokenizer, tokenizer_name, vocab_size, eos_id, num_docs, num_tokens);
  crc.update(header.data(), header.size());
  crc.update_i64(doc_offsets.data(), doc_offsets.size());
  return crc.value();
}

void write_token_dataset(const std::string& path, const std::vector<uint32_t>& tokens,
                         const std::vector<int64_t>& doc_offsets, const std::string& tokenizer,
                         const std::string& tokenizer_name, int64_t vocab_size, int64_t eos_id) {
  QuietHdf5 quiet;
  auto check = [&](bool ok, const char* what) {
    NEXTRON_CHECK(ok, "writing token dataset '", path, "' failed (", what, "); check the directory and free space");
  };
  H5Id fapl = checksummed_format_access();
  check(fapl.valid(), "cannot set up HDF5 file access");
  H5Id file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
  check(file.valid(), "cannot create the file");
  auto dataset = [&](const char* name, hid_t file_type, hid_t mem_type, const void* data, size_t n) {
    const hsize_t dims = n;
    H5Id space(H5Screate_simple(1, &dims, nullptr), H5Sclose);
    H5Id ds(H5Dcreate2(file.get(), name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
    check(ds.valid() && (n == 0 || H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0), name);
  };
  dataset("tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, tokens.data(), tokens.size());
  dataset("doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, doc_offsets.data(), doc_offsets.size());
  auto attr = [&](const char* name, hid_t file_type, hid_t mem_type, const void* v) {
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id a(H5Acreate2(file.get(), name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    check(a.valid() && H5Awrite(a.get(), mem_type, v) >= 0, name);
  };
  // Fixed-length strings, as preprocess.py writes them: variable-length ones live in HDF5's global heap, which has
  // no checksum.
  auto str_attr = [&](const char* name, const std::string& v) {
    H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(type.get(), std::max<size_t>(1, v.size()));
    H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
    H5Tset_cset(type.get(), H5T_CSET_UTF8);
    std::string padded = v;
    padded.resize(std::max<size_t>(1, v.size()), '\0');
    attr(name, type.get(), type.get(), padded.data());
  };
  auto int_attr = [&](const char* name, int64_t v) { attr(name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v); };
  str_attr("format", kTokenDatasetFormat);
  int_attr("format_version", kTokenDatasetFormatVersion);
  str_attr("tokenizer", tokenizer);
  str_attr("tokenizer_name", tokenizer_name);
  int_attr("vocab_size", vocab_size);
  int_attr("eos_id", eos_id);
  int_attr("num_docs", static_cast<int64_t>(doc_offsets.size()) - 1);
  int_attr("num_tokens", static_cast<int64_t>(tokens.size()));
  int_attr(kChecksumAttr,
           token_metadata_crc32(kTokenDatasetFormat, kTokenDatasetFormatVersion, tokenizer, tokenizer_name, vocab_size,
                                eos_id, static_cast<int64_t>(doc_offsets.size()) - 1,
                                static_cast<int64_t>(tokens.size()), doc_offsets));
  check(file.close(), "closing the file");
}

void check_vocab(const TokenDataset& dataset, int64_t model_vocab) {
  NEXTRON_CHECK(dataset.vocab_size() <= model_vocab, "token dataset '", dataset.path(),
                "' was tokenized with vocab_size ", dataset.vocab_size(), " (tokenizer ", dataset.tokenizer_name(),
                "), larger than the model's vocab_size ", model_vocab,
                ": its token ids would index past the embedding; use a model config with vocab_size >= ",
                dataset.vocab_size(), " or re-tokenize the data with the model's tokenizer (tools/preprocess.py)");
}

}  // namespace nextron
