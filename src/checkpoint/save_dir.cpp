#include "checkpoint/save_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <optional>
#include <utility>

#include "core/error.h"

namespace nextron {

namespace fs = std::filesystem;

namespace {

constexpr const char* kLockFile = ".lock";

std::string errno_text(int err) { return std::strerror(err); }

// The pid of "step_<N>.tmp-<pid>" / "step_<N>.del-<pid>", or nothing for any other name.
std::optional<int64_t> leftover_pid(const std::string& name) {
  const auto d = parse_step_dir_name(name);
  if (!d || d->kind == StepDirName::Kind::checkpoint) return std::nullopt;
  return d->pid;
}

bool is_checkpoint_name(const std::string& name) {
  const auto d = parse_step_dir_name(name);
  return d && d->kind == StepDirName::Kind::checkpoint;
}

// The closest existing ancestor of `path` (itself excluded), which must be a writable directory: `what` names the
// option for the message. Writability is probed by creating and removing a directory there, because access(2)
// says yes to root on any mode and knows nothing of read-only mounts.
void check_creatable(const std::string& what, const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(strip_trailing_separators(path), ec).parent_path();
  while (!p.empty() && !fs::exists(p, ec) && p != p.root_path()) p = p.parent_path();
  NEXTRON_CHECK(fs::is_directory(p, ec), what, " '", path, "' cannot be created: '", p.string(),
                "' is not a directory; choose another path");
  std::string probe = (p / ".nextron-write-test-XXXXXX").string();
  if (::mkdtemp(probe.data()) == nullptr) {
    const int err = errno;
    NEXTRON_CHECK(false, what, " '", path, "' cannot be created: '", p.string(), "' is not writable (", errno_text(err),
                  "); choose a path in a writable directory");
  }
  ::rmdir(probe.c_str());
}

// `path` made absolute and normal with symlinks of its existing part resolved, for comparing paths.
fs::path canonical_for_compare(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec) p = fs::absolute(path, ec).lexically_normal();
  return fs::path(strip_trailing_separators(p.string()));
}

// Whether `inner` is `outer` or lies under it.
bool is_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

std::string holder_line() {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "?");
  const std::time_t now = std::time(nullptr);
  char when[64] = {};
  std::tm tm{};
  if (::localtime_r(&now, &tm) != nullptr) std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
  char line[512];
  std::snprintf(line, sizeof line, "pid %ld on host %s since %s", static_cast<long>(::getpid()), host, when);
  return line;
}

std::string read_all(int fd) {
  std::string text;
  char buf[512];
  for (off_t at = 0;;) {
    const ssize_t n = ::pread(fd, buf, sizeof buf, at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
    at += n;
  }
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

}  // namespace

std::optional<StepDirName> parse_step_dir_name(const std::string& name) {
  if (name.rfind("step_", 0) != 0) return std::nullopt;
  size_t i = 5;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == 5 || i - 5 > 18) return std::nullopt;
  StepDirName d;
  d.step = std::stoll(name.substr(5, i - 5));
  const std::string rest = name.substr(i);
  if (rest.empty()) return d;
  if (rest.rfind(".tmp-", 0) == 0)
    d.kind = StepDirName::Kind::tmp;
  else if (rest.rfind(".del-", 0) == 0)
    d.kind = StepDirName::Kind::del;
  else
    return std::nullopt;
  const std::string digits = rest.substr(5);
  if (!digits.empty() && digits.size() <= 9 && digits.find_first_not_of("0123456789") == std::string::npos)
    d.pid = std::stoll(digits);
  return d;
}

SaveDirLock::SaveDirLock(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  NEXTRON_CHECK(!ec, "cannot create the --save directory '", dir, "': ", ec.message(),
                "; choose a directory you can write to");
  const std::string path = (fs::path(dir) / kLockFile).string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  NEXTRON_CHECK(fd_ >= 0, "cannot open the lock file '", path, "' of the --save directory: ", errno_text(errno),
                "; choose a directory you can write to");
  int rc;
  do rc = ::flock(fd_, LOCK_EX | LOCK_NB);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    const int err = errno;
    const std::string holder = read_all(fd_);
    ::close(std::exchange(fd_, -1));
    NEXTRON_CHECK(err != EWOULDBLOCK, "the --save directory '", dir, "' is in use by another nextron-train run (",
                  holder.empty() ? "a process that has not written its name yet" : holder, ", see ", path,
                  "); two runs in one directory overwrite each other's checkpoints and metrics: wait for it to finish "
                  "or stop it, or give this run another --save directory");
    NEXTRON_CHECK(false, "cannot lock the --save directory '", dir, "' (flock on ", path, ": ", errno_text(err),
                  "); its file system may not support locks: use a --save directory on a local or lock-capable file "
                  "system");
  }
  previous_holder_ = read_all(fd_);
  const std::string line = holder_line() + "\n";
  // Best effort: the line only improves the message a second run gets; the flock itself is the lock.
  const bool written =
      ::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, line.data(), line.size(), 0) == static_cast<ssize_t>(line.size());
  (void)written;
}

SaveDirLock::~SaveDirLock() {
  if (fd_ < 0) return;
  // Emptied while still held: a later run then knows this one ended cleanly (if this fails, the next run only
  // mentions this holder as a previous one). Unlocked by the close.
  const bool emptied = ::ftruncate(fd_, 0) == 0;
  (void)emptied;
  ::close(fd_);
}

std::vector<SaveLeftover> find_save_leftovers(const std::string& save_dir) {
  std::vector<SaveLeftover> out;
  std::error_code ec;
  for (fs::directory_iterator it(save_dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code ec2;
    if (!it->is_directory(ec2)) continue;
    if (auto pid = leftover_pid(it->path().filename().string())) out.push_back({it->path().string(), *pid});
  }
  std::sort(out.begin(), out.end(), [](const SaveLeftover& a, const SaveLeftover& b) { return a.path < b.path; });
  return out;
}

bool process_alive(int64_t pid) {
  if (pid <= 0 || pid == static_cast<int64_t>(::getpid())) return false;
  // EPERM: it exists but belongs to another user, so it is alive.
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
}

uint64_t disk_usage(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(fs::symlink_status(path, ec))) {
    const auto size = fs::is_regular_file(fs::symlink_status(path, ec)) ? fs::file_size(path, ec) : 0;
    return ec ? 0 : size;
  }
  uint64_t total = 0;
  for (fs::recursive_directory_iterator it(path, fs::directory_options::skip_permission_denied, ec), end;
       !ec && it != end; it.increment(ec)) {
    std::error_code ec2;
    if (it->is_regular_file(ec2) && !it->is_symlink(ec2)) {
      const auto size = it->file_size(ec2);
      if (!ec2) total += size;
    }
  }
  return total;
}

std::string format_bytes(uint64_t bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char s[64];
  if (u == 0)
    std::snprintf(s, sizeof s, "%llu bytes", static_cast<unsigned long long>(bytes));
  else
    std::snprintf(s, sizeof s, "%.1f %s", v, units[u]);
  return s;
}

std::vector<std::string> remove_stale_leftovers(const std::string& save_dir, const std::string& export_dir) {
  std::vector<std::string> log;
  if (!save_dir.empty()) {
    for (const SaveLeftover& l : find_save_leftovers(save_dir)) {
      const bool tmp = l.path.find(".tmp-") != std::string::npos;
      const char* what = tmp ? "an interrupted checkpoint save" : "an interrupted checkpoint deletion";
      if (process_alive(l.pid)) {
        log.push_back("kept '" + l.path + "' (" + what + " of pid " + std::to_string(l.pid) +
                      ", which is running on this host)");
        continue;
      }
      const uint64_t bytes = disk_usage(l.path);
      std::error_code ec;
      fs::remove_all(l.path, ec);
      log.push_back(ec ? "could not remove '" + l.path + "' (" + what + "): " + ec.message()
                       : "removed '" + l.path + "' (" + format_bytes(bytes) + "), " + what + " of pid " +
                             std::to_string(l.pid) + ", which is no longer running");
    }
  }
  if (!export_dir.empty()) {
    const std::string partial = strip_trailing_separators(export_dir) + ".partial";
    std::error_code ec;
    if (fs::exists(fs::symlink_status(partial, ec))) {
      const uint64_t bytes = disk_usage(partial);
      fs::remove_all(partial, ec);
      log.push_back(ec ? "could not remove '" + partial + "' (an unfinished HF export): " + ec.message()
                       : "removed '" + partial + "' (" + format_bytes(bytes) +
                             "), an unfinished HF export of an earlier run");
    }
  }
  return log;
}

std::vector<std::string> existing_checkpoints(const std::string& save_dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(save_dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code ec2;
    if (it->is_directory(ec2) && is_checkpoint_name(it->path().filename().string())) out.push_back(it->path().string());
  }
  // Zero-padded names sort by step, except past 8 digits: compare the numbers.
  auto step_of = [](const std::string& p) { return std::stoll(fs::path(p).filename().string().substr(5)); };
  std::sort(out.begin(), out.end(),
            [&](const std::string& a, const std::string& b) { return step_of(a) > step_of(b); });
  return out;
}

std::vector<std::string> clear_save_dir(const std::string& save_dir, const std::string& metrics) {
  std::vector<std::string> log;
  for (const std::string& dir : existing_checkpoints(save_dir)) {
    const uint64_t bytes = disk_usage(dir);
    const std::string doomed = dir + ".del-" + std::to_string(::getpid());
    NEXTRON_CHECK(::rename(dir.c_str(), doomed.c_str()) == 0, "--overwrite-save: cannot remove checkpoint '", dir,
                  "': ", errno_text(errno), "; remove it by hand or use a new --save directory");
    std::error_code ec;
    fs::remove_all(doomed, ec);
    NEXTRON_CHECK(!ec, "--overwrite-save: cannot remove '", doomed, "': ", ec.message(),
                  "; remove it by hand or use a new --save directory");
    log.push_back("removed checkpoint '" + dir + "' (" + format_bytes(bytes) + ") for --overwrite-save");
  }
  std::error_code ec;
  if (!metrics.empty() && fs::is_regular_file(metrics, ec)) {
    const uint64_t bytes = disk_usage(metrics);
    fs::remove(metrics, ec);
    NEXTRON_CHECK(!ec, "--overwrite-save: cannot remove the old metrics '", metrics, "': ", ec.message());
    log.push_back("removed '" + metrics + "' (" + format_bytes(bytes) + ") for --overwrite-save");
  }
  return log;
}

void check_save_path(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    NEXTRON_CHECK(fs::is_directory(dir, ec), "--save '", dir,
                  "' exists and is not a directory; give a directory for the checkpoints");
    return;
  }
  check_creatable("--save", dir);
}

void check_metrics_path(const std::string& path) {
  std::error_code ec;
  if (fs::exists(path, ec)) {
    NEXTRON_CHECK(!fs::is_directory(path, ec), "the metrics file '", path,
                  "' is a directory; give --metrics a file path (JSON Lines)");
    const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    const int err = errno;
    if (fd >= 0) ::close(fd);
    NEXTRON_CHECK(fd >= 0, "cannot write the metrics file '", path, "' (", errno_text(err),
                  "); make it writable or give --metrics another path");
    return;
  }
  check_creatable("the metrics file", path);
}

void check_export_path(const std::string& dir, const std::string& save_dir, const std::string& metrics) {
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    NEXTRON_CHECK(fs::is_directory(dir, ec), "--export-hf '", dir,
                  "' is an existing file, and the export writes a directory; choose a new path or remove the file");
    NEXTRON_CHECK(fs::is_empty(dir, ec), "--export-hf '", dir,
                  "' already exists and is not empty (an export never overwrites one); choose a new directory or "
                  "remove it");
  }
  // The export fills "<dir>.partial" beside it and renames it into place: the parent must be writable.
  check_creatable("--export-hf", dir);
  const fs::path e = canonical_for_compare(dir);
  NEXTRON_CHECK(save_dir.empty() || !is_within(canonical_for_compare(save_dir), e), "--export-hf '", dir,
                "' is or contains the --save directory '", save_dir,
                "', and an export needs an empty directory; export to a directory of its own, e.g. SAVE/hf");
  NEXTRON_CHECK(metrics.empty() || !is_within(canonical_for_compare(metrics), e), "--export-hf '", dir,
                "' contains the metrics file '", metrics,
                "', and an export needs an empty directory; export to a directory of its own");
}

std::string strip_trailing_separators(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

}  // namespace nextron
