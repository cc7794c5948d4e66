#include "checkpoint/train_checkpoint.h"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "checkpoint/save_dir.h"
#include "core/error.h"
#include "core/hdf5.h"

namespace nextron {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kMetadataFile = "metadata.h5";
constexpr const char* kStateFile = "state.json";
constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kMetadataFormat = "nextron-train-metadata";
constexpr const char* kShardFormat = "nextron-train-shard";
constexpr const char* kStateFormat = "nextron-train-state";
constexpr const char* kManifestFormat = "nextron-train-checkpoint";
constexpr int64_t kSlab = int64_t{1} << 24;   // elements per HDF5 read/write call
constexpr int64_t kStage = int64_t{1} << 22;  // elements staged per write of a shard's runs (16 MiB)
constexpr const char* kUseOlder = "resume from an earlier checkpoint (move this directory away) or start a new run";
constexpr const char* kDiskFix = "free disk space or choose another --save directory";

// ---------------------------------------------------------------------------------------------------------------
// XXH64 (seed 0), streaming.

class Xxh64 {
 public:
  void update(const unsigned char* p, size_t n) {
    total_ += n;
    if (fill_ + n < 32) {
      std::memcpy(buf_ + fill_, p, n);
      fill_ += n;
      return;
    }
    if (fill_ > 0) {
      const size_t take = 32 - fill_;
      std::memcpy(buf_ + fill_, p, take);
      consume(buf_);
      p += take;
      n -= take;
      fill_ = 0;
    }
    for (; n >= 32; p += 32, n -= 32) consume(p);
    std::memcpy(buf_, p, n);
    fill_ = n;
  }

  uint64_t digest() const {
    uint64_t h = kP5;
    if (total_ >= 32) {
      h = rotl(v_[0], 1) + rotl(v_[1], 7) + rotl(v_[2], 12) + rotl(v_[3], 18);
      for (uint64_t v : v_) h = (h ^ round(0, v)) * kP1 + kP4;
    }
    h += total_;
    const unsigned char* p = buf_;
    size_t n = fill_;
    for (; n >= 8; p += 8, n -= 8) h = rotl(h ^ round(0, load(p, 8)), 27) * kP1 + kP4;
    if (n >= 4) {
      h = rotl(h ^ load(p, 4) * kP1, 23) * kP2 + kP3;
      p += 4;
      n -= 4;
    }
    for (; n > 0; ++p, --n) h = rotl(h ^ *p * kP5, 11) * kP1;
    h ^= h >> 33;
    h *= kP2;
    h ^= h >> 29;
    h *= kP3;
    h ^= h >> 32;
    return h;
  }

 private:
  static constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full, kP3 = 0x165667B19E3779F9ull,
                            kP4 = 0x85EBCA77C2B2AE63ull, kP5 = 0x27D4EB2F165667C5ull;
  static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
  static uint64_t round(uint64_t acc, uint64_t lane) { return rotl(acc + lane * kP2, 31) * kP1; }
  // Little-endian load of `bytes` bytes (compiles to one load on little-endian machines).
  static uint64_t load(const unsigned char* p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }
  void consume(const unsigned char* p) {
    for (int i = 0; i < 4; ++i) v_[i] = round(v_[i], load(p + 8 * i, 8));
  }

  uint64_t v_[4] = {kP1 + kP2, kP2, 0, 0 - kP1};
  unsigned char buf_[32] = {};
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

std::string hex64(uint64_t v) {
  char s[17];
  std::snprintf(s, sizeof s, "%016" PRIx64, v);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Test hook, warnings, POSIX file helpers.

std::function<void(const std::string&)>& stage_hook() {
  static std::function<void(const std::string&)> hook;
  return hook;
}

void stage_done(const std::string& stage) {
  if (stage_hook()) stage_hook()(stage);
}

void warn(const std::string& message) { std::fprintf(stderr, "nextron: warning: %s\n", message.c_str()); }

std::string errno_text() { return std::strerror(errno); }

// A POSIX file descriptor, closed on scope exit.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now and reports whether that worked (a delayed write error can surface here).
  bool close() { return ::close(std::exchange(fd_, -1)) == 0; }

 private:
  int fd_;
};

void fsync_path(const fs::path& p, bool directory) {
  Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0)));
  NEXTRON_CHECK(fd.get() >= 0, "cannot open '", p.string(), "' to flush it to disk: ", errno_text());
  NEXTRON_CHECK(::fsync(fd.get()) == 0, "flushing '", p.string(), "' to disk failed: ", errno_text(), "; ", kDiskFix);
}

// Creates `p` (which must not exist) holding `text`, flushed to disk.
void write_file_durably(const fs::path& p, const std::string& text) {
  Fd fd(::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  NEXTRON_CHECK(fd.get() >= 0, "cannot create '", p.string(), "': ", errno_text(), "; ", kDiskFix);
  for (size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    NEXTRON_CHECK(n > 0, "writing '", p.string(), "' failed: ", errno_text(), "; ", kDiskFix);
    done += static_cast<size_t>(n);
  }
  NEXTRON_CHECK(::fsync(fd.get()) == 0, "flushing '", p.string(), "' to disk failed: ", errno_text(), "; ", kDiskFix);
  NEXTRON_CHECK(fd.close(), "closing '", p.string(), "' failed: ", errno_text(), "; ", kDiskFix);
}

struct FileDigest {
  uint64_t bytes = 0;
  uint64_t hash = 0;
};

FileDigest digest_file(const fs::path& p) {
  Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
  NEXTRON_CHECK(fd.get() >= 0, "cannot open '", p.string(), "': ", errno_text());
  std::vector<unsigned char> buf(size_t{4} << 20);
  Xxh64 h;
  FileDigest d;
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    NEXTRON_CHECK(n >= 0, "reading '", p.string(), "' failed: ", errno_text());
    if (n == 0) break;
    h.update(buf.data(), static_cast<size_t>(n));
    d.bytes += static_cast<uint64_t>(n);
  }
  d.hash = h.digest();
  return d;
}

std::string read_text_file(const fs::path& p) {
  Fd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
  NEXTRON_CHECK(fd.get() >= 0, "cannot open '", p.string(), "': ", errno_text());
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    NEXTRON_CHECK(n >= 0, "reading '", p.string(), "' failed: ", errno_text());
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  return text;
}

// ---------------------------------------------------------------------------------------------------------------
// Checkpoint directory names: step_<digits> (complete or not) and step_<digits>.tmp-<pid> (a save in progress).

struct StepDir {
  int64_t step = 0;
  bool tmp = false;
  fs::path path;
};

std::optional<StepDir> parse_step_dir(const fs::path& p) {
  const auto name = parse_step_dir_name(p.filename().string());
  if (!name || name->kind == StepDirName::Kind::del) return std::nullopt;  // a checkpoint being deleted
  return StepDir{name->step, name->kind == StepDirName::Kind::tmp, p};
}

// Every step directory under root, newest step first (at one step, an unfinished save before the checkpoint).
std::vector<StepDir> list_step_dirs(const fs::path& root) {
  std::vector<StepDir> dirs;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code ec2;
    if (!it->is_directory(ec2)) continue;
    if (auto d = parse_step_dir(it->path())) dirs.push_back(*d);
  }
  std::sort(dirs.begin(), dirs.end(), [](const StepDir& a, const StepDir& b) {
    if (a.step != b.step) return a.step > b.step;
    if (a.tmp != b.tmp) return a.tmp;
    return a.path < b.path;
  });
  return dirs;
}

// "shard_<rank, 5 digits>.bin": rank `rank`'s parameters and moments.
std::string shard_file_name(int rank) {
  char name[32];
  std::snprintf(name, sizeof name, "shard_%05d.bin", rank);
  return name;
}

// ---------------------------------------------------------------------------------------------------------------
// Manifest.

struct ManifestEntry {
  std::string name;
  uint64_t bytes = 0;
  uint64_t hash = 0;
};

struct Manifest {
  int64_t step = 0;
  int64_t shards = 0;  // the number of ranks that wrote it: shard_00000.h5 ... one per rank
  std::vector<ManifestEntry> files;
  const ManifestEntry* find(const std::string& name) const {
    for (const ManifestEntry& e : files)
      if (e.name == name) return &e;
    return nullptr;
  }
};

// Parses manifest.json of `dir` and checks its structure (not the files it lists).
Manifest read_manifest(const fs::path& dir) {
  const fs::path p = dir / kManifestFile;
  std::error_code ec;
  NEXTRON_CHECK(fs::exists(p, ec), "checkpoint '", dir.string(), "' is incomplete: it has no ", kManifestFile,
                " (its save was interrupted before it finished); ", kUseOlder);
  Manifest m;
  try {
    const json j = json::parse(read_text_file(p));
    NEXTRON_CHECK(j.at("format").get<std::string>() == kManifestFormat, "checkpoint '", dir.string(),
                  "': ", kManifestFile, " has format '", j.at("format").get<std::string>(), "', expected '",
                  kManifestFormat, "'; ", kUseOlder);
    const int64_t version = j.at("format_version").get<int64_t>();
    NEXTRON_CHECK(version <= kTrainCheckpointFormatVersion, "checkpoint '", dir.string(),
                  "' was written by a newer nextron (format version ", version, "; this build reads up to ",
                  kTrainCheckpointFormatVersion, "); resume it with the nextron that wrote it");
    NEXTRON_CHECK(version >= 2, "checkpoint '", dir.string(), "' is in format ", version,
                  " (whole-model model.h5 + optimizer.h5), which this build no longer reads: export it to HF with the "
                  "nextron that wrote it (nextron-convert) and start from that with --init-from");
    NEXTRON_CHECK(version >= 3, "checkpoint '", dir.string(), "' is in format ", version,
                  ", whose Gated DeltaNet projections (in_proj_qkvz, in_proj_ba) keep HF's per-key-head row order; "
                  "this build keeps them per part and does not read it: export it to HF with the nextron that wrote "
                  "it (nextron-convert) and start from that with --init-from");
    NEXTRON_CHECK(j.at("checksum").get<std::string>() == "xxh64", "checkpoint '", dir.string(), "': ", kManifestFile,
                  " uses checksum '", j.at("checksum").get<std::string>(), "', this build knows xxh64; ", kUseOlder);
    m.step = j.at("step").get<int64_t>();
    m.shards = j.at("shards").get<int64_t>();
    std::set<std::string> seen;
    for (const json& f : j.at("files")) {
      ManifestEntry e;
      e.name = f.at("name").get<std::string>();
      e.bytes = f.at("bytes").get<uint64_t>();
      const std::string hash = f.at("xxh64").get<std::string>();
      NEXTRON_CHECK(hash.size() == 16 && hash.find_first_not_of("0123456789abcdef") == std::string::npos,
                    "checkpoint '", dir.string(), "': ", kManifestFile, " has a malformed checksum for '", e.name,
                    "'; ", kUseOlder);
      e.hash = std::stoull(hash, nullptr, 16);
      NEXTRON_CHECK(!e.name.empty() && e.name.find('/') == std::string::npos && e.name != "." && e.name != ".." &&
                        e.name != kManifestFile && seen.insert(e.name).second,
                    "checkpoint '", dir.string(), "': ", kManifestFile, " lists a bad file name '", e.name, "'; ",
                    kUseOlder);
      m.files.push_back(e);
    }
  } catch (const json::exception& e) {
    NEXTRON_CHECK(false, "checkpoint '", dir.string(), "': ", kManifestFile, " is not a valid manifest (", e.what(),
                  "); ", kUseOlder);
  }
  NEXTRON_CHECK(m.shards >= 1 && m.shards <= (int64_t{1} << 24), "checkpoint '", dir.string(), "': ", kManifestFile,
                " says it has ", m.shards, " shards; ", kUseOlder);
  std::vector<std::string> required = {kMetadataFile, kStateFile};
  for (int64_t r = 0; r < m.shards; ++r) required.push_back(shard_file_name(static_cast<int>(r)));
  for (const std::string& name : required)
    NEXTRON_CHECK(m.find(name) != nullptr, "checkpoint '", dir.string(), "': ", kManifestFile, " does not list ", name,
                  "; ", kUseOlder);
  return m;
}

// Compares `name`'s checksum with the manifest's.
void check_checksum(const fs::path& dir, const ManifestEntry& e) {
  const FileDigest d = digest_file(dir / e.name);
  NEXTRON_CHECK(d.bytes == e.bytes && d.hash == e.hash, "checkpoint '", dir.string(), "' is damaged: the xxh64 ",
                "checksum of ", e.name, " is ", hex64(d.hash), ", its manifest says ", hex64(e.hash),
                " (the file was modified or corrupted); ", kUseOlder);
}

// Checks that every listed file exists with its size, and with `checksums` also the checksums of the files whose
// index in the manifest is `part` modulo `parts`.
Manifest check_files(const fs::path& dir, bool checksums, int part = 0, int parts = 1) {
  Manifest m = read_manifest(dir);
  for (size_t i = 0; i < m.files.size(); ++i) {
    const ManifestEntry& e = m.files[i];
    const fs::path p = dir / e.name;
    std::error_code ec;
    const uintmax_t size = fs::file_size(p, ec);
    NEXTRON_CHECK(!ec, "checkpoint '", dir.string(), "' is incomplete: ", e.name, " is missing (", ec.message(), "); ",
                  kUseOlder);
    NEXTRON_CHECK(size == e.bytes, "checkpoint '", dir.string(), "' is damaged: ", e.name, " is ", size,
                  " bytes, its manifest says ", e.bytes, " (truncated or overwritten); ", kUseOlder);
    if (checksums && static_cast<int>(i % static_cast<size_t>(parts)) == part) check_checksum(dir, e);
  }
  return m;
}

void check_step_name(const std::string& dir, const Manifest& m) {
  // --resume auto and keep-last order checkpoints by their names, the run continues at the manifest's step: a
  // directory renamed or copied under another step's name would resume somewhere else than it claims.
  fs::path p(dir);
  if (!p.has_filename()) p = p.parent_path();
  if (const auto d = parse_step_dir(p); d && !d->tmp)
    NEXTRON_CHECK(d->step == m.step, "checkpoint '", dir, "' is named for step ", d->step, " but its ", kManifestFile,
                  " says step ", m.step, " (renamed or copied under the wrong name); rename it to ",
                  fs::path(train_checkpoint_dir(".", m.step)).filename().string(), " or ", kUseOlder);
}

// ---------------------------------------------------------------------------------------------------------------
// HDF5.

// File access: no HDF5 file locking (the directory protocol already gives each file a single writer, and locking
// fails on some network file systems).
// New files get HDF5 1.10's checksummed metadata (core/hdf5.h).
H5Id file_access() {
  H5Id fapl = checksummed_format_access();
#if H5_VERSION_GE(1, 10, 7)
  if (fapl.valid()) H5Pset_file_locking(fapl.get(), false, true);
#endif
  return fapl;
}

// Variable-length UTF-8 strings: how checkpoints before the 1.10 file format stored text (still read).
H5Id utf8_string_type() {
  H5Id t(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(t.get(), H5T_VARIABLE);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}

// Fixed-length UTF-8 strings of `bytes` bytes, NUL-padded: how text is written. Variable-length strings live in
// HDF5's global heap, which has no checksum, and a damaged one can crash the reader.
H5Id fixed_utf8_type(size_t bytes) {
  H5Id t(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(t.get(), std::max<size_t>(1, bytes));
  H5Tset_strpad(t.get(), H5T_STR_NULLPAD);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}

// The string in a NUL-padded fixed-length field.
std::string unpad(const char* p, size_t bytes) { return std::string(p, std::find(p, p + bytes, '\0')); }

// Elements [begin, begin + count) of 1-D dataset `ds`, in slabs, from (write) or to (read) `mem`.
bool transfer_1d(hid_t ds, hid_t mem_type, size_t elem_bytes, int64_t begin, int64_t count, const void* src,
                 void* dst) {
  for (int64_t done = 0; done < count; done += kSlab) {
    const hsize_t start = static_cast<hsize_t>(begin + done);
    const hsize_t n = static_cast<hsize_t>(std::min(kSlab, count - done));
    H5Id fspace(H5Dget_space(ds), H5Sclose);
    H5Id mspace(H5Screate_simple(1, &n, nullptr), H5Sclose);
    if (!fspace.valid() || !mspace.valid() ||
        H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &n, nullptr) < 0)
      return false;
    const size_t at = static_cast<size_t>(done) * elem_bytes;
    const herr_t r =
        src != nullptr
            ? H5Dwrite(ds, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, static_cast<const char*>(src) + at)
            : H5Dread(ds, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, static_cast<char*>(dst) + at);
    if (r < 0) return false;
  }
  return true;
}

// Room reserved for HDF5's own metadata on top of the data a file holds (a few KiB in practice).
constexpr uint64_t kMetadataSlack = uint64_t{256} << 10;

class H5Writer {
 public:
  // Creates `path` with disk space reserved for `data_bytes` of data (see create_reserved).
  H5Writer(fs::path path, uint64_t data_bytes) : path_(std::move(path)) {
    create_reserved(data_bytes + kMetadataSlack);
  }

  void attr_i64(const char* name, int64_t v) { attr(name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v); }
  void attr_f64(const char* name, double v) { attr(name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v); }
  void attr_str(const char* name, const std::string& v) {
    H5Id type = fixed_utf8_type(v.size());
    std::string padded = v;
    padded.resize(std::max<size_t>(1, v.size()), '\0');
    attr(name, type.get(), type.get(), padded.data());
  }

  void dataset_f32(const char* name, const float* data, int64_t n) {
    dataset(name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, sizeof(float), data, n);
  }
  void dataset_i64(const char* name, const std::vector<int64_t>& v) {
    dataset(name, H5T_STD_I64LE, H5T_NATIVE_INT64, sizeof(int64_t), v.data(), static_cast<int64_t>(v.size()));
  }
  void dataset_strings(const char* name, const std::vector<std::string>& v) {
    size_t width = 1;
    for (const auto& s : v) width = std::max(width, s.size());
    std::vector<char> packed(v.size() * width, '\0');
    for (size_t i = 0; i < v.size(); ++i) std::copy(v[i].begin(), v[i].end(), packed.begin() + i * width);
    H5Id type = fixed_utf8_type(width);
    dataset(name, type.get(), type.get(), width, packed.data(), static_cast<int64_t>(v.size()));
  }

  // Closes the file and flushes it to disk.
  void finish() {
    check(file_.close(), "closing the file");
    // Gives back what the reservation held beyond the file's end (best effort: file systems that keep it merely
    // waste a little space).
    std::error_code ec;
    const uintmax_t size = fs::file_size(path_, ec);
    [[maybe_unused]] const int trimmed = ec ? -1 : ::truncate(path_.c_str(), static_cast<off_t>(size));
    fsync_path(path_, false);
  }

 private:
  void check(bool ok, const char* what) const {
    NEXTRON_CHECK(ok, "writing '", path_.string(), "' failed (", what, "); ", kDiskFix);
  }

  // HDF5 1.10 cannot recover from a write that fails inside H5Fclose (disk full): the close fails but frees the
  // file's state and keeps its handle, which HDF5's exit handler closes again, crashing the process at exit. So
  // running out of space must be found before HDF5 has anything to write: the process's file size limit
  // (ulimit -f) is checked first, then the file is created (HDF5 writes its 48-byte superblock at once, so a full
  // disk fails here, cleanly) and disk space for everything it will hold is reserved (fallocate). Should the
  // reservation fail, closing the still empty file only rewrites that first, already allocated block. File systems
  // without fallocate skip the reservation, which leaves that crash possible there.
  void create_reserved(uint64_t reserve_bytes) {
    rlimit limit{};
    NEXTRON_CHECK(
        ::getrlimit(RLIMIT_FSIZE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY || reserve_bytes <= limit.rlim_cur,
        "cannot write '", path_.string(), "': it needs about ", reserve_bytes,
        " bytes but this process may write files of at most ", limit.rlim_cur,
        " bytes (ulimit -f); raise the limit or ", kDiskFix);
    H5Id fapl = file_access();
    check(fapl.valid(), "cannot set up HDF5 file access");
    file_ = H5Id(H5Fcreate(path_.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), H5Fclose);
    check(file_.valid(), "cannot create the file");
    Fd fd(::open(path_.c_str(), O_WRONLY | O_CLOEXEC));
    NEXTRON_CHECK(fd.get() >= 0, "cannot open '", path_.string(), "': ", errno_text(), "; ", kDiskFix);
    if (::fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(reserve_bytes)) != 0) {
      NEXTRON_CHECK(errno == EOPNOTSUPP || errno == ENOSYS, "cannot reserve ", reserve_bytes,
                    " bytes of disk space for '", path_.string(), "': ", errno_text(), "; ", kDiskFix);
    }
  }

  void attr(const char* name, hid_t file_type, hid_t mem_type, const void* v) {
    H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
    H5Id a(H5Acreate2(file_.get(), name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    check(a.valid() && H5Awrite(a.get(), mem_type, v) >= 0, name);
  }
  void dataset(const char* name, hid_t file_type, hid_t mem_type, size_t elem_bytes, const void* data, int64_t n) {
    const hsize_t dims = static_cast<hsize_t>(n);
    H5Id space(H5Screate_simple(1, &dims, nullptr), H5Sclose);
    H5Id ds(H5Dcreate2(file_.get(), name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
    check(ds.valid() && transfer_1d(ds.get(), mem_type, elem_bytes, 0, n, data, nullptr), name);
  }

  QuietHdf5 quiet_;  // declared first: restored last
  fs::path path_;
  H5Id file_;
};

class H5Reader {
 public:
  // Opens `path` and checks its format attributes. `dir` names the checkpoint in messages.
  H5Reader(const fs::path& dir, const std::string& name, const char* format) : dir_(dir.string()), name_(name) {
    const fs::path path = dir / name;
    std::error_code ec;
    file_bytes_ = fs::file_size(path, ec);
    check(!ec, "cannot be read (", ec.message(), ")");
    H5Id fapl = file_access();
    file_ = H5Id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose);
    check(file_.valid(), "is not a readable HDF5 file");
    check(attr_str("format") == format, "is not a ", format, " file");
    const int64_t version = attr_i64("format_version");
    NEXTRON_CHECK(version <= kTrainCheckpointFormatVersion, "checkpoint '", dir_, "': ", name_,
                  " was written by a newer nextron (format version ", version, "; this build reads up to ",
                  kTrainCheckpointFormatVersion, "); resume it with the nextron that wrote it");
  }

  const std::string& name() const { return name_; }

  template <typename... Args>
  void check(bool ok, const Args&... what) const {
    NEXTRON_CHECK(ok, "checkpoint '", dir_, "': ", name_, " ", what..., " (damaged, or not written by nextron-train); ",
                  kUseOlder);
  }

  int64_t attr_i64(const char* name) const {
    H5Id a = open_attr(name);
    H5Id type(H5Aget_type(a.get()), H5Tclose);
    int64_t v = 0;
    check(H5Tget_class(type.get()) == H5T_INTEGER && H5Aread(a.get(), H5T_NATIVE_INT64, &v) >= 0,
          "has an unreadable integer attribute '", name, "'");
    return v;
  }
  double attr_f64(const char* name) const {
    H5Id a = open_attr(name);
    H5Id type(H5Aget_type(a.get()), H5Tclose);
    double v = 0;
    check(H5Tget_class(type.get()) == H5T_FLOAT && H5Aread(a.get(), H5T_NATIVE_DOUBLE, &v) >= 0,
          "has an unreadable float attribute '", name, "'");
    return v;
  }
  std::string attr_str(const char* name) const {
    H5Id a = open_attr(name);
    H5Id type(H5Aget_type(a.get()), H5Tclose);
    check(H5Tget_class(type.get()) == H5T_STRING, "attribute '", name, "' is not a string");
    if (H5Tis_variable_str(type.get()) <= 0) {
      const size_t bytes = H5Tget_size(type.get());
      check(bytes > 0 && bytes <= file_bytes_, "has a string attribute '", name, "' longer than the file");
      std::vector<char> buf(bytes);
      H5Id mem = fixed_utf8_type(bytes);
      check(H5Aread(a.get(), mem.get(), buf.data()) >= 0, "has an unreadable string attribute '", name, "'");
      return unpad(buf.data(), bytes);
    }
    H5Id mem = utf8_string_type();
    char* s = nullptr;
    check(H5Aread(a.get(), mem.get(), &s) >= 0, "has an unreadable string attribute '", name, "'");
    std::string out = s != nullptr ? s : "";
    H5free_memory(s);
    return out;
  }

  // Length of 1-D dataset `name`, whose elements must be of class `cls` and `bytes` wide (0: any width).
  int64_t length(const char* name, H5T_class_t cls, size_t bytes) const {
    H5Id ds = open_dataset(name);
    H5Id type(H5Dget_type(ds.get()), H5Tclose);
    check(H5Tget_class(type.get()) == cls && (bytes == 0 || H5Tget_size(type.get()) == bytes), "dataset '", name,
          "' has the wrong element type");
    H5Id space(H5Dget_space(ds.get()), H5Sclose);
    check(space.valid() && H5Sget_simple_extent_ndims(space.get()) == 1, "dataset '", name, "' is not 1-D");
    // Every element takes at least one byte of the file (16 for a variable-length string's reference), so a
    // damaged extent is caught here, before anyone allocates or loops over it.
    hsize_t n = 0;
    const uint64_t elem = H5Tis_variable_str(type.get()) > 0 ? 16 : H5Tget_size(type.get());
    check(H5Sget_simple_extent_dims(space.get(), &n, nullptr) == 1 && elem > 0 && n <= file_bytes_ / elem, "dataset '",
          name, "' claims more elements than the file holds");
    return static_cast<int64_t>(n);
  }

  void read_f32(const char* name, int64_t begin, int64_t count, float* out) const {
    const int64_t n = length(name, H5T_FLOAT, sizeof(float));
    check(begin >= 0 && begin + count <= n, "dataset '", name, "' is shorter than its attributes say");
    H5Id ds = open_dataset(name);
    check(transfer_1d(ds.get(), H5T_NATIVE_FLOAT, sizeof(float), begin, count, nullptr, out), "dataset '", name,
          "' cannot be read");
  }
  std::vector<int64_t> read_i64(const char* name) const {
    std::vector<int64_t> v(static_cast<size_t>(length(name, H5T_INTEGER, 0)));
    H5Id ds = open_dataset(name);
    check(
        transfer_1d(ds.get(), H5T_NATIVE_INT64, sizeof(int64_t), 0, static_cast<int64_t>(v.size()), nullptr, v.data()),
        "dataset '", name, "' cannot be read");
    return v;
  }
  std::vector<std::string> read_strings(const char* name) const {
    const int64_t n = length(name, H5T_STRING, 0);
    H5Id ds = open_dataset(name);
    H5Id type(H5Dget_type(ds.get()), H5Tclose);
    std::vector<std::string> out;
    if (n == 0) return out;
    if (H5Tis_variable_str(type.get()) <= 0) {  // n * width <= the file's size: length() checked it
      const size_t width = H5Tget_size(type.get());
      std::vector<char> packed(static_cast<size_t>(n) * width);
      H5Id mem = fixed_utf8_type(width);
      check(transfer_1d(ds.get(), mem.get(), width, 0, n, nullptr, packed.data()), "dataset '", name,
            "' cannot be read");
      for (int64_t i = 0; i < n; ++i) out.push_back(unpad(packed.data() + static_cast<size_t>(i) * width, width));
      return out;
    }
    std::vector<char*> ptrs(static_cast<size_t>(n), nullptr);
    H5Id mem = utf8_string_type();
    check(H5Dread(ds.get(), mem.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) >= 0, "dataset '", name,
          "' cannot be read");
    for (char* p : ptrs) out.emplace_back(p != nullptr ? p : "");
    H5Id space(H5Dget_space(ds.get()), H5Sclose);
#if H5_VERSION_GE(1, 12, 0)
    H5Treclaim(mem.get(), space.get(), H5P_DEFAULT, ptrs.data());
#else
    H5Dvlen_reclaim(mem.get(), space.get(), H5P_DEFAULT, ptrs.data());
#endif
    return out;
  }

 private:
  H5Id open_attr(const char* name) const {
    check(H5Aexists(file_.get(), name) > 0, "has no attribute '", name, "'");
    H5Id a(H5Aopen(file_.get(), name, H5P_DEFAULT), H5Aclose);
    check(a.valid(), "has an unreadable attribute '", name, "'");
    return a;
  }
  H5Id open_dataset(const char* name) const {
    check(H5Lexists(file_.get(), name, H5P_DEFAULT) > 0, "has no dataset '", name, "'");
    H5Id ds(H5Dopen2(file_.get(), name, H5P_DEFAULT), H5Dclose);
    check(ds.valid(), "has an unreadable dataset '", name, "'");
    return ds;
  }

  QuietHdf5 quiet_;  // declared first: restored last
  std::string dir_, name_;
  uint64_t file_bytes_ = 0;
  H5Id file_;
};

// ---------------------------------------------------------------------------------------------------------------
// The files.

// One index record per run group: which shard, params or moments, and the group (7 integers).
constexpr int kIndexFields = 7;
enum class Stored : int64_t { params = 0, moments = 1 };

// Rank 0's file: the config, the parameter table, the optimizer's step count and hyperparameters, and the index of
// every shard's run groups.
void write_metadata_file(const fs::path& p, const std::string& config_text, const ParamTable& table, int64_t shards,
                         int64_t steps_taken, const AdamWHyper& hyper, const std::vector<int64_t>& index) {
  std::vector<std::string> names;
  std::vector<int64_t> offsets, ndim, dims;
  for (const ParamSpec& s : table.specs()) {
    names.push_back(s.name);
    offsets.push_back(s.offset);
    ndim.push_back(static_cast<int64_t>(s.shape.size()));
    dims.insert(dims.end(), s.shape.begin(), s.shape.end());
  }
  uint64_t bytes = 8 * (offsets.size() + ndim.size() + dims.size() + index.size()) + config_text.size();
  for (const std::string& n : names) bytes += n.size() + 32;
  H5Writer w(p, bytes);
  w.attr_str("format", kMetadataFormat);
  w.attr_i64("format_version", kTrainCheckpointFormatVersion);
  w.attr_str("model_config", config_text);
  w.attr_i64("total_numel", table.total_numel());
  w.attr_i64("shards", shards);
  w.attr_i64("steps_taken", steps_taken);
  w.attr_f64("lr", hyper.lr);
  w.attr_f64("beta1", hyper.beta1);
  w.attr_f64("beta2", hyper.beta2);
  w.attr_f64("eps", hyper.eps);
  w.attr_f64("weight_decay", hyper.weight_decay);
  w.attr_i64("decay_all", hyper.decay_all ? 1 : 0);
  w.dataset_strings("param_names", names);
  w.dataset_i64("param_offsets", offsets);
  w.dataset_i64("param_ndim", ndim);
  w.dataset_i64("param_dims", dims);
  w.dataset_i64("index", index);
  w.finish();
}

// ---------------------------------------------------------------------------------------------------------------
// Shard files: a 64-byte header, then the rank's parameter runs' elements, its exp_avg and its exp_avg_sq, float32
// little-endian, back to back. Not HDF5: --async-save writes them on a background thread while the training thread
// reads token datasets through the serial (not thread-safe) HDF5 library.

constexpr char kShardMagic[8] = {'N', 'X', 'T', 'S', 'H', 'A', 'R', 'D'};
struct ShardHeader {
  char magic[8];
  int64_t format_version, rank, shards, total_numel, params, moments, reserved;
};
static_assert(sizeof(ShardHeader) == 64, "the shard header is 64 bytes");
constexpr uint64_t kShardHeaderBytes = sizeof(ShardHeader);

uint64_t shard_file_bytes(int64_t params, int64_t moments) {
  return kShardHeaderBytes + 4 * static_cast<uint64_t>(params + 2 * moments);
}

void write_all(int fd, const fs::path& p, const void* data, size_t n) {
  const char* c = static_cast<const char*>(data);
  for (size_t done = 0; done < n;) {
    const ssize_t k = ::write(fd, c + done, n - done);
    if (k < 0 && errno == EINTR) continue;
    NEXTRON_CHECK(k > 0, "writing '", p.string(), "' failed: ", errno_text(), "; ", kDiskFix);
    done += static_cast<size_t>(k);
  }
}

// Writes shard file `p` of rank `rank`: the file's whole size is reserved first (a full disk or a file size limit
// is an error before anything is written), the runs are staged kStage elements at a time (the only memory a save
// adds beyond the rank's host copies), and the file is flushed to disk.
void write_shard_file(const fs::path& p, int rank, int shards, int64_t total_numel, const CheckpointShard& s) {
  int64_t np = 0, nm = 0;
  for (const FlatRun& r : s.param_runs) np += r.count;
  for (const FlatRun& r : s.moment_runs) nm += r.count;
  const uint64_t bytes = shard_file_bytes(np, nm);
  rlimit limit{};
  NEXTRON_CHECK(::getrlimit(RLIMIT_FSIZE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY || bytes <= limit.rlim_cur,
                "cannot write '", p.string(), "': it needs ", bytes,
                " bytes but this process may write files of at most ", limit.rlim_cur,
                " bytes (ulimit -f); raise the limit or ", kDiskFix);
  Fd fd(::open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  NEXTRON_CHECK(fd.get() >= 0, "cannot create '", p.string(), "': ", errno_text(), "; ", kDiskFix);
  if (::fallocate(fd.get(), 0, 0, static_cast<off_t>(bytes)) != 0)
    NEXTRON_CHECK(errno == EOPNOTSUPP || errno == ENOSYS, "cannot reserve ", bytes, " bytes of disk space for '",
                  p.string(), "': ", errno_text(), "; ", kDiskFix);
  ShardHeader h{};
  std::memcpy(h.magic, kShardMagic, sizeof h.magic);
  h.format_version = kTrainCheckpointFormatVersion;
  h.rank = rank;
  h.shards = shards;
  h.total_numel = total_numel;
  h.params = np;
  h.moments = nm;
  write_all(fd.get(), p, &h, sizeof h);
  std::vector<float> stage;
  stage.reserve(static_cast<size_t>(std::min(std::max(np, nm), kStage)));
  auto runs_out = [&](const float* base, const std::vector<FlatRun>& runs) {
    for (const FlatRun& r : runs)
      for (int64_t done = 0; done < r.count;) {
        const int64_t take = std::min(r.count - done, kStage - static_cast<int64_t>(stage.size()));
        const float* from = base + r.local_offset + done;
        stage.insert(stage.end(), from, from + take);
        done += take;
        if (static_cast<int64_t>(stage.size()) == kStage) {
          write_all(fd.get(), p, stage.data(), stage.size() * sizeof(float));
          stage.clear();
        }
      }
    write_all(fd.get(), p, stage.data(), stage.size() * sizeof(float));
    stage.clear();
  };
  runs_out(s.params, s.param_runs);
  runs_out(s.exp_avg, s.moment_runs);
  runs_out(s.exp_avg_sq, s.moment_runs);
  NEXTRON_CHECK(::fsync(fd.get()) == 0, "flushing '", p.string(), "' to disk failed: ", errno_text(), "; ", kDiskFix);
  NEXTRON_CHECK(fd.close(), "closing '", p.string(), "' failed: ", errno_text(), "; ", kDiskFix);
}

// A shard file opened for reading, its header checked against what the index says it holds.
class ShardReader {
 public:
  ShardReader(const fs::path& dir, const std::string& name, int rank, int64_t shards, int64_t total_numel,
              int64_t params, int64_t moments)
      : dir_(dir.string()),
        name_(name),
        fd_(::open((dir / name).c_str(), O_RDONLY | O_CLOEXEC)),
        params_(params),
        moments_(moments) {
    check(fd_.get() >= 0, "cannot be opened (", errno_text(), ")");
    ShardHeader h{};
    read_at(0, &h, sizeof h);
    check(std::memcmp(h.magic, kShardMagic, sizeof h.magic) == 0, "is not a nextron checkpoint shard");
    NEXTRON_CHECK(h.format_version <= kTrainCheckpointFormatVersion, "checkpoint '", dir_, "': ", name_,
                  " was written by a newer nextron (format version ", h.format_version,
                  "); resume it with that nextron");
    check(h.rank == rank && h.shards == shards && h.total_numel == total_numel,
          "belongs to another checkpoint (its rank, shard count or model size differ)");
    check(h.params == params && h.moments == moments, "holds another number of elements than ", kMetadataFile,
          " indexes");
    struct stat st {};
    check(::fstat(fd_.get(), &st) == 0 && static_cast<uint64_t>(st.st_size) == shard_file_bytes(params, moments),
          "has the wrong size for the elements it holds");
  }

  // Elements [pos, pos + count) of dataset `which` (0 params, 1 exp_avg, 2 exp_avg_sq).
  void read(int which, int64_t pos, int64_t count, float* out) const {
    const int64_t length = which == 0 ? params_ : moments_;
    check(pos >= 0 && count >= 0 && pos <= length - count, "is shorter than its index says");
    const int64_t base = which == 0 ? 0 : params_ + (which - 1) * moments_;
    read_at(kShardHeaderBytes + 4 * static_cast<uint64_t>(base + pos), out, 4 * static_cast<size_t>(count));
  }

 private:
  template <typename... Args>
  void check(bool ok, const Args&... what) const {
    NEXTRON_CHECK(ok, "checkpoint '", dir_, "': ", name_, " ", what..., " (damaged, or not written by nextron-train); ",
                  kUseOlder);
  }
  void read_at(uint64_t offset, void* out, size_t n) const {
    char* c = static_cast<char*>(out);
    for (size_t done = 0; done < n;) {
      const ssize_t k = ::pread(fd_.get(), c + done, n - done, static_cast<off_t>(offset + done));
      if (k < 0 && errno == EINTR) continue;
      check(k > 0, "cannot be read (", k < 0 ? errno_text() : std::string("it ends early"), ")");
      done += static_cast<size_t>(k);
    }
  }

  std::string dir_, name_;
  Fd fd_;
  int64_t params_, moments_;
};

// The runs as stored: the same full offsets, at their positions in the shard's dataset.
std::vector<RunGroup> stored_groups(const std::vector<FlatRun>& runs) {
  std::vector<FlatRun> stored;
  int64_t at = 0;
  for (const FlatRun& r : runs) {
    stored.push_back(FlatRun{r.full_offset, at, r.count});
    at += r.count;
  }
  return group_runs(stored);
}

std::string state_text(const TrainState& s) {
  json j;
  j["format"] = kStateFormat;
  j["format_version"] = kTrainCheckpointFormatVersion;
  j["step"] = s.step;
  j["data_position"] = s.data_position;
  j["consumed_tokens"] = s.consumed_tokens;
  j["rng_state"] = s.rng_state;
  j["scheduler"] = s.scheduler;
  j["args"] = s.args;
  try {
    return j.dump(2) + "\n";
  } catch (const json::exception& e) {
    NEXTRON_CHECK(false, "cannot store the training state as JSON (", e.what(),
                  "): rng_state and every string in scheduler and args must be UTF-8 text; encode binary state "
                  "as hex or base64");
  }
  return {};
}

TrainState read_state_file(const fs::path& dir) {
  TrainState s;
  try {
    const json j = json::parse(read_text_file(dir / kStateFile));
    NEXTRON_CHECK(j.at("format").get<std::string>() == kStateFormat, "checkpoint '", dir.string(), "': ", kStateFile,
                  " is not a ", kStateFormat, " file; ", kUseOlder);
    const int64_t version = j.at("format_version").get<int64_t>();
    NEXTRON_CHECK(version <= kTrainCheckpointFormatVersion, "checkpoint '", dir.string(), "': ", kStateFile,
                  " was written by a newer nextron (format version ", version, "); resume it with that nextron");
    s.step = j.at("step").get<int64_t>();
    s.data_position = j.at("data_position").get<int64_t>();
    s.consumed_tokens = j.at("consumed_tokens").get<int64_t>();
    s.rng_state = j.at("rng_state").get<std::string>();
    s.scheduler = j.at("scheduler");
    s.args = j.at("args");
  } catch (const json::exception& e) {
    NEXTRON_CHECK(false, "checkpoint '", dir.string(), "': ", kStateFile, " is not a valid training state (", e.what(),
                  "); ", kUseOlder);
  }
  return s;
}

// The first place (dotted path) where the stored and the expected config differ, with both values.
bool first_difference(const json* stored, const json* expected, const std::string& path, std::string* where,
                      std::string* was, std::string* is) {
  if (stored != nullptr && expected != nullptr && stored->is_object() && expected->is_object()) {
    std::set<std::string> keys;
    for (auto it = stored->begin(); it != stored->end(); ++it) keys.insert(it.key());
    for (auto it = expected->begin(); it != expected->end(); ++it) keys.insert(it.key());
    for (const std::string& k : keys) {
      const json* a = stored->contains(k) ? &stored->at(k) : nullptr;
      const json* b = expected->contains(k) ? &expected->at(k) : nullptr;
      if (first_difference(a, b, path.empty() ? k : path + "." + k, where, was, is)) return true;
    }
    return false;
  }
  if (stored != nullptr && expected != nullptr && *stored == *expected) return false;
  *where = path;
  *was = stored != nullptr ? stored->dump() : "(unset)";
  *is = expected != nullptr ? expected->dump() : "(unset)";
  return true;
}

void check_config(const fs::path& dir, const H5Reader& model, const ModelConfig& expect) {
  json stored;
  try {
    stored = json::parse(model.attr_str("model_config"));
  } catch (const json::exception& e) {
    model.check(false, "has a model_config attribute that is not JSON (", e.what(), ")");
  }
  const json expected = expect.to_json();
  std::string where, was, is;
  NEXTRON_CHECK(!first_difference(&stored, &expected, "", &where, &was, &is), "checkpoint '", dir.string(),
                "' was trained with ", where, " ", was, ", the model config says ", is,
                "; resume with the model config it was trained with (the model_config attribute of its metadata.h5) or "
                "save the new run to another directory");
}

void check_table(const fs::path& dir, const H5Reader& model, const ParamTable& table) {
  const auto names = model.read_strings("param_names");
  const auto offsets = model.read_i64("param_offsets");
  const auto ndim = model.read_i64("param_ndim");
  const auto dims = model.read_i64("param_dims");
  model.check(offsets.size() == names.size() && ndim.size() == names.size(),
              "has parameter table datasets of different lengths");
  const auto& specs = table.specs();
  const char* fix =
      "; the checkpoint was written with another parameter layout (another nextron version?): export "
      "it to HF format with the nextron that wrote it and start from that with --init-from";
  NEXTRON_CHECK(names.size() == specs.size(), "checkpoint '", dir.string(), "': ", kMetadataFile, " lists ",
                names.size(), " parameters, the model has ", specs.size(), fix);
  size_t at = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    model.check(ndim[i] >= 0 && at + static_cast<size_t>(ndim[i]) <= dims.size(),
                "has a parameter table whose shapes do not add up");
    const Shape shape(dims.begin() + static_cast<std::ptrdiff_t>(at),
                      dims.begin() + static_cast<std::ptrdiff_t>(at + static_cast<size_t>(ndim[i])));
    at += static_cast<size_t>(ndim[i]);
    const ParamSpec& s = specs[i];
    NEXTRON_CHECK(names[i] == s.name && shape == s.shape && offsets[i] == s.offset, "checkpoint '", dir.string(),
                  "': parameter ", i, " of ", kMetadataFile, " is '", names[i], "' ", shape_str(shape), " at offset ",
                  offsets[i], ", the model's is '", s.name, "' ", shape_str(s.shape), " at offset ", s.offset, fix);
  }
  model.check(at == dims.size(), "has a parameter table whose shapes do not add up");
  model.check(model.attr_i64("total_numel") == table.total_numel(),
              "holds a number of parameters that does not match its parameter table");
}

// Moves a finished checkpoint from `tmp` to `final_dir`, replacing a checkpoint of the same step.
void install(const fs::path& tmp, const fs::path& final_dir) {
  if (::rename(tmp.c_str(), final_dir.c_str()) == 0) return;
  NEXTRON_CHECK(errno == EEXIST || errno == ENOTEMPTY, "renaming '", tmp.string(), "' to '", final_dir.string(),
                "' failed: ", errno_text());
  std::error_code ec;
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(tmp, ec);  // now the old checkpoint of this step
    return;
  }
  // No atomic exchange on this file system: move the old one aside first (a crash in between loses only the old
  // checkpoint of this step, never an earlier one).
  const fs::path aside = final_dir.string() + ".del-" + std::to_string(::getpid());
  fs::remove_all(aside, ec);
  NEXTRON_CHECK(::rename(final_dir.c_str(), aside.c_str()) == 0, "cannot replace the existing checkpoint '",
                final_dir.string(), "': ", errno_text());
  NEXTRON_CHECK(::rename(tmp.c_str(), final_dir.c_str()) == 0, "renaming '", tmp.string(), "' to '", final_dir.string(),
                "' failed: ", errno_text());
  fs::remove_all(aside, ec);
}

// keep_last: deletes complete checkpoints older than `step` beyond the keep_last newest (the one of `step`
// counts). "Complete" here is the cheap check (manifest, file sizes), not the checksums. Failures are warnings.
void prune(const fs::path& root, int64_t step, int keep_last) {
  int kept = 1;
  for (const StepDir& d : list_step_dirs(root)) {
    if (d.tmp || d.step >= step) continue;
    bool complete = true;
    try {
      check_files(d.path, /*checksums=*/false);
    } catch (const Error&) {
      complete = false;
    }
    if (!complete) continue;  // never resumed from; left for inspection
    if (kept < keep_last) {
      ++kept;
      continue;
    }
    // Renamed first so that a crash while deleting never leaves a half-deleted step_<N> behind.
    const fs::path doomed = d.path.string() + ".del-" + std::to_string(::getpid());
    if (::rename(d.path.c_str(), doomed.c_str()) != 0) {
      warn("cannot delete old checkpoint '" + d.path.string() + "': " + errno_text());
      continue;
    }
    std::error_code ec;
    fs::remove_all(doomed, ec);
    if (ec) warn("cannot delete old checkpoint '" + doomed.string() + "': " + ec.message());
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

uint64_t xxh64(const void* data, size_t size) {
  Xxh64 h;
  h.update(static_cast<const unsigned char*>(data), size);
  return h.digest();
}

std::string train_checkpoint_dir(const std::string& root, int64_t step) {
  NEXTRON_CHECK(step >= 0, "checkpoint step must be >= 0, got ", step);
  char name[32];
  std::snprintf(name, sizeof name, "step_%08" PRId64, step);
  return (fs::path(root) / name).string();
}

namespace {

// Every rank learns whether any rank failed: the failing ones throw their own message, the others `elsewhere`.
void agree(Communicator* world, const std::string& error, const std::string& elsewhere) {
  double failed = error.empty() ? 0 : 1;
  if (world != nullptr) world->all_reduce_sum(&failed, 1);
  if (failed > 0) throw Error(error.empty() ? elsewhere : error);
}

template <typename F>
std::string capture(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

void check_runs(const std::vector<FlatRun>& runs, int64_t total, const char* what) {
  for (const FlatRun& r : runs)
    NEXTRON_CHECK(r.count >= 0 && r.full_offset >= 0 && r.local_offset >= 0 && r.full_offset + r.count <= total,
                  "save_train_checkpoint: a ", what, " run [", r.full_offset, ", +", r.count,
                  ") is not inside the model's ", total, " parameters");
}

// The record a rank sends rank 0: its shard file's size and checksum, a failure flag, then its run groups.
std::vector<int64_t> shard_record(bool failed, const FileDigest& d, const std::vector<RunGroup>& params,
                                  const std::vector<RunGroup>& moments) {
  std::vector<int64_t> rec = {failed ? 1 : 0, static_cast<int64_t>(d.bytes), static_cast<int64_t>(d.hash),
                              static_cast<int64_t>(params.size()), static_cast<int64_t>(moments.size())};
  for (const auto* groups : {&params, &moments})
    for (const RunGroup& g : *groups) rec.insert(rec.end(), {g.first, g.count, g.stride, g.repeats, g.local});
  return rec;
}

}  // namespace

CheckpointSave::CheckpointSave(Communicator* world, const std::string& root, const ModelConfig& config,
                               const ParamTable& table, const CheckpointShard& shard, const TrainState& state,
                               int keep_last)
    : world_(world),
      rank_(world != nullptr ? world->rank() : 0),
      shards_(world != nullptr ? world->size() : 1),
      table_(table),
      shard_(shard),
      root_(root),
      step_(state.step),
      keep_last_(keep_last) {
  const int64_t total = table.total_numel();
  const fs::path root_path(root);
  final_dir_ = train_checkpoint_dir(root, state.step);
  elsewhere_ = "another rank failed while saving checkpoint '" + final_dir_ +
               "' (its message is in its error output); " + kDiskFix;
  std::error_code ec;
  // Checks everywhere, the temporary directory on rank 0 (named by rank 0's pid, which every rank learns).
  std::string error = capture([&] {
    check_runs(shard.param_runs, total, "parameter");
    check_runs(shard.moment_runs, total, "moment");
    NEXTRON_CHECK(shard.param_runs.empty() || shard.params != nullptr,
                  "save_train_checkpoint: the parameters are null; pass the rank's host copy");
    NEXTRON_CHECK(shard.moment_runs.empty() || (shard.exp_avg != nullptr && shard.exp_avg_sq != nullptr),
                  "save_train_checkpoint: the optimizer moments are null; pass the rank's host copies");
    NEXTRON_CHECK(state.step >= 0 && state.data_position >= 0 && state.consumed_tokens >= 0 && shard.steps_taken >= 0,
                  "save_train_checkpoint: step (", state.step, "), data position (", state.data_position,
                  "), consumed tokens (", state.consumed_tokens, ") and steps taken (", shard.steps_taken,
                  ") must all be >= 0");
    NEXTRON_CHECK(keep_last >= 0, "keep_last is ", keep_last, "; use a positive count, or 0 to keep every checkpoint");
    if (rank_ != 0) return;
    state_json_ = state_text(state);  // before touching the disk: may reject non-UTF-8 strings
    config_json_ = config.to_json().dump();
    fs::create_directories(root_path, ec);
    NEXTRON_CHECK(!ec, "cannot create checkpoint directory '", root, "': ", ec.message(), "; ", kDiskFix);
    const fs::path tmp = final_dir_ + ".tmp-" + std::to_string(::getpid());
    fs::remove_all(tmp, ec);  // left by an earlier process with our pid
    NEXTRON_CHECK(fs::create_directory(tmp, ec) && !ec, "cannot create '", tmp.string(), "': ", ec.message(), "; ",
                  kDiskFix);
  });
  double setup[2] = {error.empty() ? 0.0 : 1.0, rank_ == 0 ? static_cast<double>(::getpid()) : 0.0};
  if (world_ != nullptr) world_->all_reduce_sum(setup, 2);
  tmp_ = final_dir_ + ".tmp-" + std::to_string(static_cast<long long>(setup[1]));
  if (setup[0] > 0) {
    if (rank_ == 0) fs::remove_all(tmp_, ec);
    finished_ = true;
    throw Error(error.empty() ? elsewhere_ : error);
  }
}

CheckpointSave::~CheckpointSave() {
  if (!finished_ && rank_ == 0) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

const std::string& CheckpointSave::dir() const { return final_dir_; }

void CheckpointSave::write_shard() {
  write_error_ = capture([&] {
    const fs::path file = fs::path(tmp_) / shard_file_name(rank_);
    write_shard_file(file, rank_, shards_, table_.total_numel(), shard_);
    const FileDigest d = digest_file(file);
    digest_bytes_ = d.bytes;
    digest_hash_ = d.hash;
    stage_done("shard");
  });
}

std::string CheckpointSave::finish() {
  std::string error = write_error_;
  std::vector<int64_t> record = shard_record(!error.empty(), FileDigest{digest_bytes_, digest_hash_},
                                             stored_groups(shard_.param_runs), stored_groups(shard_.moment_runs));
  std::error_code ec;
  // Rank 0 collects the shards' records (point to point: only it holds the index), writes the metadata, the state
  // and the manifest, and installs the checkpoint.
  if (rank_ != 0) {
    int64_t n = static_cast<int64_t>(record.size());
    world_->send(&n, 1, DType::i64, 0, 0);
    world_->send(record.data(), n, DType::i64, 0, 1);
  } else {
    std::vector<int64_t> index;  // kIndexFields per group
    nlohmann::ordered_json files = nlohmann::ordered_json::array();
    bool any_failed = false;
    for (int r = 0; r < shards_; ++r) {
      if (r > 0) {
        int64_t n = 0;
        world_->recv(&n, 1, DType::i64, r, 0);
        record.assign(static_cast<size_t>(n), 0);
        world_->recv(record.data(), n, DType::i64, r, 1);
      }
      any_failed = any_failed || record[0] != 0;
      files.push_back({{"name", shard_file_name(r)},
                       {"bytes", static_cast<uint64_t>(record[1])},
                       {"xxh64", hex64(static_cast<uint64_t>(record[2]))}});
      const int64_t groups = record[3] + record[4];
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t* f = record.data() + 5 + 5 * g;
        const auto kind = g < record[3] ? Stored::params : Stored::moments;
        index.insert(index.end(), {r, static_cast<int64_t>(kind), f[0], f[1], f[2], f[3], f[4]});
      }
    }
    if (error.empty() && any_failed) error = elsewhere_;
    if (error.empty())
      error = capture([&] {
        const fs::path tmp(tmp_);
        write_metadata_file(tmp / kMetadataFile, config_json_, table_, shards_, shard_.steps_taken, shard_.hyper,
                            index);
        stage_done(kMetadataFile);
        write_file_durably(tmp / kStateFile, state_json_);
        stage_done(kStateFile);
        nlohmann::ordered_json manifest;
        manifest["format"] = kManifestFormat;
        manifest["format_version"] = kTrainCheckpointFormatVersion;
        manifest["step"] = step_;
        manifest["shards"] = shards_;
        manifest["checksum"] = "xxh64";
        for (const char* name : {kMetadataFile, kStateFile}) {
          const FileDigest d = digest_file(tmp / name);
          files.push_back({{"name", name}, {"bytes", d.bytes}, {"xxh64", hex64(d.hash)}});
        }
        manifest["files"] = files;
        write_file_durably(tmp / kManifestFile, manifest.dump(2) + "\n");
        fsync_path(tmp, /*directory=*/true);
        stage_done(kManifestFile);
        install(tmp, final_dir_);
        fsync_path(root_, /*directory=*/true);
      });
    if (!error.empty()) fs::remove_all(tmp_, ec);
  }
  finished_ = true;
  agree(world_, error, elsewhere_);
  if (rank_ == 0) {
    stage_done("renamed");
    if (keep_last_ > 0) prune(root_, step_, keep_last_);
  }
  return final_dir_;
}

std::string save_train_checkpoint(Communicator* world, const std::string& root, const ModelConfig& config,
                                  const ParamTable& table, const CheckpointShard& shard, const TrainState& state,
                                  int keep_last) {
  CheckpointSave save(world, root, config, table, shard, state, keep_last);
  save.write_shard();
  return save.finish();
}

std::string save_train_checkpoint(const std::string& root, const ModelConfig& config, const ParamTable& table,
                                  const float* params, const OptimizerShard& optimizer, const TrainState& state,
                                  int keep_last) {
  const int64_t total = table.total_numel();
  const FlatRange r = optimizer.range;
  NEXTRON_CHECK(params != nullptr, "save_train_checkpoint: params is null; pass the model's flat parameters");
  NEXTRON_CHECK(0 <= r.begin && r.begin <= r.end && r.end <= total, "optimizer range [", r.begin, ", ", r.end,
                ") is not inside the model's ", total, " parameters; pass the range the AdamW instance owns");
  NEXTRON_CHECK(r.size() == 0 || (optimizer.exp_avg != nullptr && optimizer.exp_avg_sq != nullptr),
                "save_train_checkpoint: the optimizer moments are null; pass AdamW::exp_avg() and exp_avg_sq()");
  CheckpointShard shard;
  shard.params = params;
  shard.param_runs = {FlatRun{0, 0, total}};
  shard.exp_avg = optimizer.exp_avg;
  shard.exp_avg_sq = optimizer.exp_avg_sq;
  shard.moment_runs = {FlatRun{r.begin, 0, r.size()}};
  shard.steps_taken = optimizer.steps_taken;
  shard.hyper = optimizer.hyper;
  return save_train_checkpoint(nullptr, root, config, table, shard, state, keep_last);
}

void verify_train_checkpoint(const std::string& dir, int part, int parts) {
  std::error_code ec;
  NEXTRON_CHECK(fs::is_directory(dir, ec), "checkpoint directory '", dir,
                "' does not exist; pass a step_<N> directory written by nextron-train");
  check_step_name(dir, check_files(dir, /*checksums=*/true, part, parts));
}

std::optional<std::string> find_latest_checkpoint(const std::string& root, Communicator* world) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return std::nullopt;
  const int rank = world != nullptr ? world->rank() : 0, W = world != nullptr ? world->size() : 1;
  for (const StepDir& d : list_step_dirs(root)) {
    if (d.tmp) {
      if (rank == 0)
        warn("ignoring '" + d.path.string() +
             "': an unfinished save (in progress, or interrupted; delete it once no run writes to this directory)");
      continue;
    }
    // Each rank reads the checksums of its share of the files.
    // (A directory named for another step than its manifest's is not skipped: loading it names the mismatch.)
    const std::string error = capture([&] { check_files(d.path, /*checksums=*/true, rank, W); });
    if (!error.empty()) warn("skipping an incomplete or damaged checkpoint: " + error);
    double failed = error.empty() ? 0 : 1;
    if (world != nullptr) world->all_reduce_sum(&failed, 1);
    if (failed == 0) return d.path.string();
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading.

struct TrainCheckpointReader::Impl {
  fs::path dir;
  std::string dir_text;
  Manifest manifest;
  std::unique_ptr<H5Reader> metadata;
  ModelConfig config;
  std::unique_ptr<ParamTable> table;
  std::vector<FlatRange> params;  // the table's parameters' flat ranges (the alignment gaps between them excluded)
  LoadedCheckpoint loaded;
  std::vector<RunGroup> groups[2];  // Stored::params, Stored::moments
  std::vector<int> group_shard[2];
  std::vector<int64_t> stored_numel[2];  // per shard: what its index says its datasets hold
  mutable std::vector<std::unique_ptr<ShardReader>> shards;

  const ShardReader& shard(int r) const {
    auto& f = shards[static_cast<size_t>(r)];
    if (!f) {
      const std::string name = shard_file_name(r);
      check_checksum(dir, *manifest.find(name));
      f = std::make_unique<ShardReader>(dir, name, r, manifest.shards, table->total_numel(),
                                        stored_numel[0][static_cast<size_t>(r)],
                                        stored_numel[1][static_cast<size_t>(r)]);
    }
    return *f;
  }

  // Fills dst[k] (k = 0: params or exp_avg, 1: exp_avg_sq) from every stored group intersecting `runs`.
  void read(Stored kind, const std::vector<FlatRun>& runs, float* const* dst, int ndst) const {
    const int k = static_cast<int>(kind);
    int uncovered = -1;
    const auto plan = plan_copies(params, table->total_numel(), groups[k], group_runs(runs), &uncovered);
    NEXTRON_CHECK(uncovered < 0, "checkpoint '", dir_text, "' holds no ",
                  kind == Stored::params ? "values" : "optimizer state", " for elements of '",
                  table->specs()[static_cast<size_t>(uncovered)].name,
                  "' that this run needs (its shards do not cover the model); ", kUseOlder);
    std::vector<float> buf;
    for (const auto& param : plan)
      for (const GroupCopies& gc : param) {
        const RunGroup& g = groups[k][static_cast<size_t>(gc.have)];
        const ShardReader& file = shard(group_shard[k][static_cast<size_t>(gc.have)]);
        buf.resize(static_cast<size_t>(gc.source_end - gc.source_begin));
        for (int d = 0; d < ndst; ++d) {
          file.read(k + d, g.local + gc.source_begin, gc.source_end - gc.source_begin, buf.data());
          for (const RunCopy& c : gc.copies)
            std::memcpy(dst[d] + c.dest, buf.data() + (c.source - gc.source_begin),
                        static_cast<size_t>(c.count) * sizeof(float));
        }
      }
  }
};

TrainCheckpointReader::TrainCheckpointReader(const std::string& dir) : impl_(new Impl) {
  try {
    Impl& m = *impl_;
    m.dir = dir;
    m.dir_text = dir;
    std::error_code ec;
    NEXTRON_CHECK(fs::is_directory(dir, ec), "checkpoint directory '", dir,
                  "' does not exist; pass a step_<N> directory written by nextron-train");
    m.manifest = check_files(m.dir, /*checksums=*/false);
    check_step_name(dir, m.manifest);
    check_checksum(m.dir, *m.manifest.find(kMetadataFile));
    check_checksum(m.dir, *m.manifest.find(kStateFile));
    m.metadata = std::make_unique<H5Reader>(m.dir, kMetadataFile, kMetadataFormat);
    const H5Reader& md = *m.metadata;
    try {
      m.config = ModelConfig::from_json(json::parse(md.attr_str("model_config")));
    } catch (const json::exception& e) {
      md.check(false, "has a model_config attribute that is not JSON (", e.what(), ")");
    }
    m.table = std::make_unique<ParamTable>(m.config);
    check_table(m.dir, md, *m.table);
    for (const ParamSpec& s : m.table->specs()) m.params.push_back({s.offset, s.offset + s.numel()});
    md.check(md.attr_i64("shards") == m.manifest.shards, "names another shard count than ", kManifestFile);
    m.loaded.state = read_state_file(m.dir);
    NEXTRON_CHECK(m.loaded.state.step == m.manifest.step, "checkpoint '", dir, "': ", kStateFile, " says step ",
                  m.loaded.state.step, ", ", kManifestFile, " says ", m.manifest.step,
                  " (files of different saves mixed); ", kUseOlder);
    m.loaded.steps_taken = md.attr_i64("steps_taken");
    AdamWHyper& h = m.loaded.hyper;
    h.lr = md.attr_f64("lr");
    h.beta1 = md.attr_f64("beta1");
    h.beta2 = md.attr_f64("beta2");
    h.eps = md.attr_f64("eps");
    h.weight_decay = md.attr_f64("weight_decay");
    h.decay_all = md.attr_i64("decay_all") != 0;
    const std::vector<int64_t> index = md.read_i64("index");
    md.check(index.size() % kIndexFields == 0, "has an index of the wrong length");
    const auto S = static_cast<size_t>(m.manifest.shards);
    for (auto& n : m.stored_numel) n.assign(S, 0);
    const int64_t total = m.table->total_numel();
    for (size_t i = 0; i < index.size(); i += kIndexFields) {
      const int64_t* f = index.data() + i;
      const RunGroup g{f[2], f[3], f[4], f[5], f[6]};
      // Every field checked before any arithmetic on it: groups inside the model, each shard's groups tiling its
      // datasets in order, and no more elements than the shard's file can hold.
      md.check(f[0] >= 0 && f[0] < m.manifest.shards && (f[1] == 0 || f[1] == 1) && group_fits(g, total),
               "has a malformed index record");
      const int64_t held = m.stored_numel[f[1]][static_cast<size_t>(f[0])];
      const auto file_bytes = static_cast<int64_t>(m.manifest.find(shard_file_name(static_cast<int>(f[0])))->bytes);
      md.check(g.local == held && g.numel() <= file_bytes / 4 - held, "has a malformed index record");
      m.groups[f[1]].push_back(g);
      m.group_shard[f[1]].push_back(static_cast<int>(f[0]));
      m.stored_numel[f[1]][static_cast<size_t>(f[0])] += g.numel();
    }
    m.shards.resize(S);
  } catch (...) {
    delete impl_;
    throw;
  }
}

TrainCheckpointReader::~TrainCheckpointReader() { delete impl_; }

const std::string& TrainCheckpointReader::dir() const { return impl_->dir_text; }
const ModelConfig& TrainCheckpointReader::config() const { return impl_->config; }
const ParamTable& TrainCheckpointReader::table() const { return *impl_->table; }
const LoadedCheckpoint& TrainCheckpointReader::loaded() const { return impl_->loaded; }

void TrainCheckpointReader::check_model(const ModelConfig& expect, const ParamTable& table) const {
  check_config(impl_->dir, *impl_->metadata, expect);
  check_table(impl_->dir, *impl_->metadata, table);
}

void TrainCheckpointReader::read_params(const std::vector<FlatRun>& runs, float* dst) const {
  float* const d[1] = {dst};
  impl_->read(Stored::params, runs, d, 1);
}

void TrainCheckpointReader::read_moments(const std::vector<FlatRun>& runs, float* exp_avg, float* exp_avg_sq) const {
  float* const d[2] = {exp_avg, exp_avg_sq};
  impl_->read(Stored::moments, runs, d, 2);
}

ModelConfig read_train_checkpoint_config(const std::string& dir) { return TrainCheckpointReader(dir).config(); }

LoadedCheckpoint load_train_checkpoint(const std::string& dir, const ModelConfig& expect_config,
                                       const ParamTable& table, float* params, FlatRange range, float* exp_avg,
                                       float* exp_avg_sq) {
  const int64_t total = table.total_numel();
  NEXTRON_CHECK(params != nullptr, "load_train_checkpoint: params is null; pass the model's flat parameters");
  NEXTRON_CHECK(0 <= range.begin && range.begin <= range.end && range.end <= total, "optimizer range [", range.begin,
                ", ", range.end, ") is not inside the model's ", total,
                " parameters; pass the range the AdamW instance owns");
  NEXTRON_CHECK(range.size() == 0 || (exp_avg != nullptr && exp_avg_sq != nullptr),
                "load_train_checkpoint: the optimizer moments are null; pass AdamW::exp_avg() and exp_avg_sq()");
  verify_train_checkpoint(dir);
  const TrainCheckpointReader reader(dir);
  reader.check_model(expect_config, table);
  reader.read_params({FlatRun{0, 0, total}}, params);
  reader.read_moments({FlatRun{range.begin, 0, range.size()}}, exp_avg, exp_avg_sq);
  return reader.loaded();
}

namespace detail {
void set_train_checkpoint_hook(std::function<void(const std::string& stage)> hook) { stage_hook() = std::move(hook); }
}  // namespace detail

}  // namespace nextron
